//! The forwarders under test, each started from a config generated here,
//! on its own port, in the foreground, with everything in a scratch dir.
use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
};

use anyhow::Result;
use splicer_testkit::{free_port, Proc};

use super::{
    tls::{Cert, SERVER_NAME},
    START,
};

/// Forwarders listen here; the bench's server and the broker use their
/// own addresses (127.0.1.2 and .4), and clients come from 127.0.1.10-13.
/// The end-to-end tests use 127.0.0.x, so both can run at once.
pub const LISTEN_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 3);

/// Threads or worker processes for HAProxy and nginx: the machine's cores,
/// which is also what splicer's runtime uses.
pub fn workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// No forwarder: the client connects straight to the server.
    Direct,
    /// splicer as it ships: the sockmap offload with `--handoff auto`
    /// (userspace until a connection goes idle or carries a bulk stream).
    Splicer,
    /// The sockmap offload with `--handoff now`: every connection in the
    /// kernel from its start.
    SplicerNow,
    SplicerUserspace,
    Haproxy,
    /// HAProxy with `option splice-request` and `option splice-response`.
    HaproxySplice,
    Nginx,
}

pub const ALL: [Kind; 7] = [
    Kind::Direct,
    Kind::Splicer,
    Kind::SplicerNow,
    Kind::SplicerUserspace,
    Kind::Haproxy,
    Kind::HaproxySplice,
    Kind::Nginx,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Splicer => "splicer",
            Kind::SplicerNow => "splicer handoff now",
            Kind::SplicerUserspace => "splicer userspace",
            Kind::Haproxy => "haproxy",
            Kind::HaproxySplice => "haproxy splice",
            Kind::Nginx => "nginx",
        }
    }
}

/// What every forwarder of one phase shares.
pub struct Setup {
    pub dir: PathBuf,
    pub splicer: PathBuf,
    pub upstream: SocketAddr,
    /// Send a PROXY v1 header upstream: v1 because nginx's stream module
    /// can send no other, and all forwarders must do the same work.
    pub send_proxy: bool,
    /// Connections each must be able to hold (sizes nginx and HAProxy).
    pub max_conns: usize,
    /// The open-files limit everything runs with.
    pub nofile: u64,
    pub mode: Mode,
}

/// How each forwarder is set up in a phase.
pub enum Mode {
    /// Bytes forwarded as they come.
    Plain,
    /// Each in its MQTT-aware set-up in front of these brokers (`upstream`
    /// is the first, for direct).
    MqttAware(Vec<SocketAddr>),
    /// Terminating TLS with `cert`, forwarding plaintext to `upstream`.
    /// Direct clients go to `sink`: the server's own TLS listener, with the
    /// same certificate.
    TlsTerminate { cert: Cert, sink: SocketAddr },
    /// Passing TLS through, routed by server name, to `upstream`: the
    /// server's TLS listener, with `cert`.
    TlsPassthrough { cert: Cert },
}

impl Mode {
    /// For config file names.
    fn name(&self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::MqttAware(_) => "mqtt",
            Mode::TlsTerminate { .. } => "tls",
            Mode::TlsPassthrough { .. } => "tls-passthrough",
        }
    }
}

impl Setup {
    /// Where `direct` clients connect.
    pub fn direct(&self) -> SocketAddr {
        match &self.mode {
            Mode::TlsTerminate { sink, .. } => *sink,
            _ => self.upstream,
        }
    }

    /// The certificate clients are shown, in the TLS phases.
    pub fn cert(&self) -> Option<&Cert> {
        match &self.mode {
            Mode::TlsTerminate { cert, .. } | Mode::TlsPassthrough { cert } => Some(cert),
            _ => None,
        }
    }
}

pub struct Forwarder {
    pub kind: Kind,
    /// Where clients connect (the upstream itself for `direct`).
    pub addr: SocketAddr,
    proc: Option<Proc>,
}

impl Forwarder {
    pub fn start(kind: Kind, setup: &Setup) -> Result<Forwarder> {
        let addr = match kind {
            Kind::Direct => setup.direct(),
            _ => SocketAddr::from((LISTEN_IP, free_port(LISTEN_IP))),
        };
        let mut f = Forwarder {
            kind,
            addr,
            proc: None,
        };
        f.restart(setup)?;
        Ok(f)
    }

    /// PID of the forwarder's main process (None for `direct`).
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Stops it if running and starts it anew on the same address, so a
    /// step can measure memory from a fresh process.
    pub fn restart(&mut self, setup: &Setup) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
        let Some(mut cmd) = command(self.kind, setup, self.addr)? else {
            return Ok(());
        };
        let name = self.kind.name().replace(' ', "-");
        let mut p = Proc::spawn(&name, &setup.dir, &mut cmd)?;
        p.wait_listening(self.addr, START)?;
        self.proc = Some(p);
        Ok(())
    }

    /// Fails with its log if it has died (checked after each step).
    pub fn check_alive(&mut self) -> Result<()> {
        match &mut self.proc {
            Some(p) => p.check_alive(),
            None => Ok(()),
        }
    }
}

/// The command line (and config file) for one forwarder.
fn command(kind: Kind, s: &Setup, listen: SocketAddr) -> Result<Option<Command>> {
    if kind == Kind::Direct {
        return Ok(None);
    }
    match &s.mode {
        Mode::Plain => plain_command(kind, s, listen),
        Mode::MqttAware(brokers) => aware_command(kind, s, listen, brokers),
        Mode::TlsTerminate { cert, .. } => terminate_command(kind, s, listen, cert),
        Mode::TlsPassthrough { .. } => passthrough_command(kind, s, listen),
    }
    .map(Some)
}

fn plain_command(kind: Kind, s: &Setup, listen: SocketAddr) -> Result<Command> {
    let up = s.upstream;
    Ok(match kind {
        Kind::Haproxy | Kind::HaproxySplice => haproxy(
            s,
            kind,
            &format!(
                "listen fwd\n    bind {listen}\n{splice}    server s1 {up}{proxy}\n",
                splice = haproxy_splice(kind),
                proxy = haproxy_proxy(s),
            ),
        )?,
        Kind::Nginx => nginx(s, &format!("proxy_pass {up};"), listen)?,
        _ => {
            let mut c = splicer(kind, s, listen);
            c.arg("--upstream").arg(up.to_string());
            c
        }
    })
}

/// splicer as `kind` runs it, listening on `listen`; upstreams to add.
fn splicer(kind: Kind, s: &Setup, listen: SocketAddr) -> Command {
    let mut c = Command::new(&s.splicer);
    c.arg("--listen").arg(listen.to_string());
    c.args(["--send-proxy", if s.send_proxy { "v1" } else { "off" }]);
    let offload = if kind == Kind::SplicerUserspace {
        "userspace"
    } else {
        "sockmap"
    };
    c.args(["--offload", offload, "--log-level", "warn"]);
    if kind == Kind::SplicerNow {
        c.args(["--handoff", "now"]);
    }
    c
}

/// HAProxy in the foreground with `proxies` (its frontends, backends or
/// listens) after the global and default settings every set-up shares.
fn haproxy(s: &Setup, kind: Kind, proxies: &str) -> Result<Command> {
    // maxpipes: by default HAProxy reserves maxconn/4 pipes (2 fds
    // each) for splicing, which would not fit the idle workload in
    // the open-files limit; a few hundred is far more than the
    // other workloads keep busy at once.
    let cfg = s.dir.join(format!(
        "{}-{}.cfg",
        kind.name().replace(' ', "-"),
        s.mode.name()
    ));
    fs::write(
        &cfg,
        format!(
            "global\n    maxconn {max}\n    maxpipes 200\n    nbthread {threads}\n\
             defaults\n    mode tcp\n    maxconn {max}\n    timeout connect 5s\n    \
             timeout client 10m\n    timeout server 10m\n{proxies}",
            max = s.max_conns,
            threads = workers(),
        ),
    )?;
    let mut c = Command::new("haproxy");
    c.arg("-db").arg("-f").arg(cfg);
    Ok(c)
}

/// HAProxy's splicing options for `kind`, as lines of a proxy section.
fn haproxy_splice(kind: Kind) -> &'static str {
    if kind == Kind::HaproxySplice {
        "    option splice-request\n    option splice-response\n"
    } else {
        ""
    }
}

/// The end of a `server` line: the PROXY header if the phase sends one.
fn haproxy_proxy(s: &Setup) -> &'static str {
    if s.send_proxy {
        " send-proxy"
    } else {
        ""
    }
}

/// nginx in the foreground with one stream server on `listen` (with
/// `listen_opts`, such as `ssl`) whose proxying is `pass` (and
/// `upstreams`, stream-level blocks, if any).
fn nginx_with(
    s: &Setup,
    upstreams: &str,
    pass: &str,
    listen: SocketAddr,
    listen_opts: &str,
) -> Result<Command> {
    let d = s.dir.join("nginx");
    fs::create_dir_all(&d)?;
    let conf = d.join(format!("nginx-{}.conf", listen.port()));
    // Each connection takes two of nginx's connection slots (client
    // and upstream), and nginx gives every slot memory up front.
    // proxy_half_close: the bulk client half-closes and waits for
    // the server's byte count, as HAProxy and splicer allow.
    fs::write(
        &conf,
        format!(
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
             daemon off;\nworker_processes {workers};\n\
             worker_rlimit_nofile {fds};\n\
             pid {d}/nginx-{port}.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections {slots}; }}\n\
             stream {{\n{upstreams}  server {{\n    listen {listen}{listen_opts} backlog=4096;\n    \
             {pass}\n    proxy_protocol {proxy};\n    \
             proxy_timeout 10m;\n    proxy_half_close on;\n  }}\n}}\n",
            workers = workers(),
            fds = s.nofile,
            slots = 2 * s.max_conns + 1024,
            d = d.display(),
            port = listen.port(),
            proxy = if s.send_proxy { "on" } else { "off" },
        ),
    )?;
    let mut c = Command::new("nginx");
    c.arg("-p")
        .arg(&d)
        .arg("-e")
        .arg(d.join("error.log"))
        .arg("-c")
        .arg(conf);
    Ok(c)
}

fn nginx(s: &Setup, pass: &str, listen: SocketAddr) -> Result<Command> {
    nginx_with(s, "", pass, listen, "")
}

/// Each forwarder set up as an MQTT deployment that routes by client would
/// be, in front of several brokers: splicer `protocol = "mqtt"` with
/// `balance = "client-id"`; HAProxy refusing what `mqtt_is_valid` refuses
/// and hashing `mqtt_field_value(connect,client_identifier)` (2.6 has
/// both); nginx, which cannot read MQTT, hashing the client address.
fn aware_command(kind: Kind, s: &Setup, listen: SocketAddr, brokers: &[SocketAddr]) -> Result<Command> {
    Ok(match kind {
        Kind::Haproxy | Kind::HaproxySplice => {
            let splice = haproxy_splice(kind);
            let servers: String = brokers
                .iter()
                .enumerate()
                .map(|(i, b)| format!("    server b{i} {b}\n"))
                .collect();
            haproxy(
                s,
                kind,
                &format!(
                    "frontend mqtt\n    bind {listen}\n{splice}    \
                     tcp-request inspect-delay 10s\n    \
                     tcp-request content reject unless {{ req.payload(0,0),mqtt_is_valid }}\n    \
                     default_backend brokers\n\
                     backend brokers\n{splice}    \
                     balance hash req.payload(0,0),mqtt_field_value(connect,client_identifier)\n    \
                     hash-type consistent\n{servers}",
                ),
            )?
        }
        Kind::Nginx => {
            let servers: String = brokers.iter().map(|b| format!("    server {b};\n")).collect();
            let upstreams = format!("  upstream brokers {{\n    hash $remote_addr consistent;\n{servers}  }}\n");
            nginx_with(s, &upstreams, "proxy_pass brokers;", listen, "")?
        }
        _ => {
            let mut c = splicer(kind, s, listen);
            c.args(["--protocol", "mqtt", "--balance", "client-id"]);
            for b in brokers {
                c.arg("--upstream").arg(b.to_string());
            }
            c
        }
    })
}

/// Each forwarder terminating TLS with the same certificate and key and
/// its TLS defaults otherwise (the client offers one cipher suite and one
/// group, so all settle the same), then forwarding plaintext as in the
/// plain set-up.
fn terminate_command(kind: Kind, s: &Setup, listen: SocketAddr, cert: &Cert) -> Result<Command> {
    let up = s.upstream;
    Ok(match kind {
        Kind::Haproxy | Kind::HaproxySplice => haproxy(
            s,
            kind,
            &format!(
                "listen fwd\n    bind {listen} ssl crt {crt}\n{splice}    server s1 {up}{proxy}\n",
                crt = cert.combined.display(),
                splice = haproxy_splice(kind),
                proxy = haproxy_proxy(s),
            ),
        )?,
        // nginx 1.22 leaves TLS 1.3 out of its default ssl_protocols.
        Kind::Nginx => nginx_with(
            s,
            "",
            &format!(
                "ssl_protocols TLSv1.2 TLSv1.3;\n    ssl_certificate {};\n    \
                 ssl_certificate_key {};\n    proxy_pass {up};",
                cert.cert.display(),
                cert.key.display()
            ),
            listen,
            " ssl",
        )?,
        _ => {
            let mut c = splicer(kind, s, listen);
            c.arg("--tls-cert").arg(&cert.cert);
            c.arg("--tls-key").arg(&cert.key);
            c.arg("--upstream").arg(up.to_string());
            c
        }
    })
}

/// Each forwarder passing TLS through untouched, reading the ClientHello
/// to route by server name as a TLS passthrough set-up does: splicer
/// `protocol = "tls-passthrough"` with an `sni` group; HAProxy
/// `req.ssl_sni`; nginx `ssl_preread` with a map.
fn passthrough_command(kind: Kind, s: &Setup, listen: SocketAddr) -> Result<Command> {
    let up = s.upstream;
    Ok(match kind {
        Kind::Haproxy | Kind::HaproxySplice => {
            let splice = haproxy_splice(kind);
            haproxy(
                s,
                kind,
                &format!(
                    "frontend tls\n    bind {listen}\n{splice}    \
                     tcp-request inspect-delay 5s\n    \
                     tcp-request content accept if {{ req.ssl_hello_type 1 }}\n    \
                     use_backend sink if {{ req.ssl_sni -i {SERVER_NAME} }}\n\
                     backend sink\n{splice}    server s1 {up}{proxy}\n",
                    proxy = haproxy_proxy(s),
                ),
            )?
        }
        Kind::Nginx => nginx_with(
            s,
            &format!(
                "  map $ssl_preread_server_name $sink {{\n    {SERVER_NAME} sink;\n  }}\n  \
                 upstream sink {{\n    server {up};\n  }}\n"
            ),
            "ssl_preread on;\n    proxy_pass $sink;",
            listen,
            "",
        )?,
        _ => {
            let mut c = splicer(kind, s, listen);
            c.args(["--protocol", "tls-passthrough"]);
            c.arg("--sni").arg(format!("{SERVER_NAME}={up}"));
            c
        }
    })
}
