//! The running listeners: start them, reload them from a new config
//! (SIGHUP), and drain them (SIGTERM).
use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use super::listener;
use crate::{
    config::{ClientAuth, Config, ForwardMode, HealthCheck, Listener, MinVersion},
    conn::ListenerCtx,
    datapath::Datapath,
    metrics::Metrics,
    upstream::health,
};

pub struct Server {
    config: Config,
    datapath: Arc<Datapath>,
    metrics: Arc<Metrics>,
    running: Vec<Running>,
}

struct Running {
    ctx: watch::Sender<Arc<ListenerCtx>>,
    accept: JoinHandle<()>,
    checks: Vec<JoinHandle<()>>,
}

impl Running {
    fn config(&self) -> Listener {
        self.ctx.borrow().config.clone()
    }

    fn stop_checks(&mut self) {
        self.checks.drain(..).for_each(|c| c.abort());
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Closes the listening socket; live connections are separate tasks.
        self.accept.abort();
        self.stop_checks();
    }
}

impl Server {
    pub fn start(config: Config, datapath: Arc<Datapath>, metrics: Arc<Metrics>) -> Result<Server> {
        let mut running = Vec::new();
        for l in &config.listeners {
            let socket = listener::bind(&l.name, l.listen)?;
            let ctx = Arc::new(ListenerCtx::new(l.clone(), datapath.clone(), &metrics, None));
            running.push(launch(ctx, socket));
        }
        Ok(Server {
            config,
            datapath,
            metrics,
            running,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Applies `new`: added listeners start, removed ones stop accepting,
    /// changed ones serve new clients with the new settings. Live
    /// connections keep what they started with. All or nothing: if any
    /// new address cannot be bound, nothing changes.
    pub fn reload(&mut self, new: Config) -> Result<()> {
        for (key, changed) in [
            ("log-level", new.log_level != self.config.log_level),
            ("log-format", new.log_format != self.config.log_format),
            ("resolv-conf", new.resolv_conf != self.config.resolv_conf),
            ("resolve-interval", new.resolve_interval != self.config.resolve_interval),
            ("offload", new.offload != self.config.offload),
            ("handoff", new.handoff != self.config.handoff),
            ("metrics", new.metrics != self.config.metrics),
            ("max-buffered", new.max_buffered != self.config.max_buffered),
        ] {
            if changed {
                log::warn!("reload: key `{key}` changed; it takes effect at the next restart");
            }
        }
        let old: HashMap<String, Listener> = self
            .running
            .iter()
            .map(|r| (r.config().name.clone(), r.config()))
            .collect();
        // Bind first, so a busy address refuses the whole reload.
        let mut sockets = HashMap::new();
        for l in &new.listeners {
            if old.get(&l.name).is_none_or(|o| o.listen != l.listen) {
                sockets.insert(l.name.clone(), listener::bind(&l.name, l.listen)?);
            }
        }
        let mut previous: HashMap<String, Running> = self
            .running
            .drain(..)
            .map(|r| (r.config().name.clone(), r))
            .collect();
        for l in &new.listeners {
            let prev = previous.remove(&l.name);
            match (prev, sockets.remove(&l.name)) {
                (Some(r), None) if r.config() == *l => self.running.push(r),
                (Some(mut r), None) => {
                    let ctx = Arc::new(ListenerCtx::new(
                        l.clone(),
                        self.datapath.clone(),
                        &self.metrics,
                        Some(&r.ctx.borrow()),
                    ));
                    r.stop_checks();
                    r.checks = spawn_checks(&ctx);
                    r.ctx.send_replace(ctx);
                    log::info!("[{}] reloaded: {}", l.name, describe(l));
                    warn_about(l);
                    self.running.push(r);
                }
                (prev, Some(socket)) => {
                    let ctx = Arc::new(ListenerCtx::new(
                        l.clone(),
                        self.datapath.clone(),
                        &self.metrics,
                        prev.as_ref().map(|r| r.ctx.borrow().clone()).as_deref(),
                    ));
                    drop(prev);
                    self.running.push(launch(ctx, socket));
                }
                (None, None) => unreachable!("a new listener always has a socket"),
            }
        }
        for (name, r) in &previous {
            log::info!("[{name}] removed: no longer accepting; live connections continue");
            for cert in r.config().terminate.iter().flat_map(|t| &t.certs) {
                self.metrics.tls_cert(name, cert, None);
            }
        }
        drop(previous);
        self.config = new;
        Ok(())
    }

    /// Stops accepting, waits up to `timeout` for live connections to
    /// finish, then closes the rest with a FIN.
    pub async fn drain(self, timeout: Duration) {
        drop(self.running);
        let totals = self.metrics.totals();
        let live = || totals.active();
        if live() > 0 {
            log::info!(
                "draining: no longer accepting; waiting up to {timeout:?} for {} connections",
                live()
            );
        }
        if !wait_idle(&live, timeout).await {
            log::warn!("drain timeout: closing {} connections", live());
            self.datapath.close_all();
            // Closing takes a few syscalls per connection; bound it anyway.
            wait_idle(&live, Duration::from_secs(5)).await;
        }
    }
}

async fn wait_idle(live: impl Fn() -> u64, timeout: Duration) -> bool {
    let start = Instant::now();
    while live() > 0 {
        if start.elapsed() >= timeout {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

fn launch(ctx: Arc<ListenerCtx>, socket: TcpListener) -> Running {
    let l = &ctx.config;
    log::info!(
        "[{}] listening on {} -> {}",
        l.name,
        socket.local_addr().map_or(l.listen, |a| a),
        describe(l)
    );
    warn_about(l);
    let checks = spawn_checks(&ctx);
    let (tx, rx) = watch::channel(ctx);
    Running {
        ctx: tx,
        accept: tokio::spawn(listener::serve(rx, socket)),
        checks,
    }
}

fn spawn_checks(ctx: &Arc<ListenerCtx>) -> Vec<JoinHandle<()>> {
    let l = &ctx.config;
    if l.health.check == HealthCheck::Off {
        return Vec::new();
    }
    ctx.balancer
        .upstreams()
        .map(|u| {
            tokio::spawn(health::check_loop(
                u.clone(),
                l.health.clone(),
                l.send_proxy,
                l.connect_timeout,
            ))
        })
        .collect()
}

/// Settings that are valid but let a client choose what the broker is told.
fn warn_about(l: &Listener) {
    let Some(ws) = &l.ws else { return };
    if l.trusted_proxies.is_empty() {
        for (key, mode) in [("forwarded-for", ws.forwarded_for), ("forwarded-port", ws.forwarded_port)] {
            if mode == ForwardMode::Append {
                log::warn!(
                    "[{}] {key} = \"append\" with no trusted-proxy: every client's own value is kept, \
                     so the leftmost entry is whatever it claims",
                    l.name
                );
            }
        }
    }
}

/// The listener's settings in one log line.
fn describe(l: &Listener) -> String {
    let upstreams: Vec<String> = l.upstreams.iter().map(std::string::ToString::to_string).collect();
    let mut s = format!(
        "{} (balance {:?}, send-proxy {:?}, accept-proxy {:?}",
        upstreams.join(", "),
        l.balance,
        l.send_proxy,
        l.accept_proxy
    );
    if l.proxy_passthrough {
        s.push_str(", passthrough");
    }
    if l.health.check != HealthCheck::Off {
        let h = &l.health;
        let _ = write!(
            s,
            ", health-check {:?} every {:?} rise {} fall {}",
            h.check, h.interval, h.rise, h.fall
        );
        if let Some(c) = &h.http {
            let port = c.port.map_or_else(|| "the upstream's".to_string(), |p| p.to_string());
            let _ = write!(s, " (GET {} on port {port}, expecting {})", c.path, c.status);
        }
    }
    let _ = write!(s, ", max-handshakes {}", l.max_handshakes);
    if let Some(m) = l.max_conns {
        let _ = write!(s, ", max-conns {m}");
    }
    if let Some(m) = &l.mqtt {
        let _ = write!(s, ", mqtt-connect-max {} timeout {:?}", m.connect_max, m.connect_timeout);
    }
    if let Some(t) = &l.tls {
        let _ = write!(s, ", tls-passthrough (not terminated; spliced like TCP)");
        for (name, ups) in &t.groups {
            let ups: Vec<String> = ups.iter().map(ToString::to_string).collect();
            let _ = write!(s, ", sni {name} -> {}", ups.join(" "));
        }
    }
    if let Some(t) = &l.terminate {
        let names: Vec<String> = t.certs.iter().map(|c| c.names.join("|")).collect();
        let _ = write!(
            s,
            ", tls terminated (TLS {}+, certificates {}, alpn [{}], client certificates {}; \
             relayed in userspace: this build has no kernel TLS)",
            match t.settings.min_version {
                MinVersion::Tls12 => "1.2",
                MinVersion::Tls13 => "1.3",
            },
            names.join(" "),
            t.settings.alpn.join(" "),
            match (&t.settings.client_ca, t.settings.client_auth) {
                (None, _) => "not asked for",
                (Some(_), ClientAuth::Optional) => "optional",
                (Some(_), ClientAuth::Required) => "required",
            }
        );
    }
    let r = &l.rate_limit;
    if let Some(rate) = r.per_source {
        let _ = write!(
            s,
            ", rate-limit {}/s burst {} per /{} and /{}",
            rate.per_sec, rate.burst, r.prefix_v4, r.prefix_v6
        );
    }
    if let Some(rate) = r.listener {
        let _ = write!(s, ", max-connect-rate {}/s", rate.per_sec);
    }
    s.push(')');
    s
}
