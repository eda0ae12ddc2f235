//! The running process: the datapath chosen once, the listeners
//! (server.rs, listener.rs), the metrics endpoint, and the signals that
//! reload (SIGHUP) and drain (SIGTERM) them. Everything shared is made here
//! and passed down as a value.
mod listener;
pub mod logging;
mod metrics_endpoint;
mod resolve;
mod server;

use std::sync::Arc;

use anyhow::Result;

use crate::{
    cli::ReloadSource,
    config::Config,
    datapath::Datapath,
    drain::Drain,
    metrics::Metrics,
};

pub async fn run(config: Config, reload: Option<ReloadSource>) -> Result<()> {
    raise_fd_limit();
    let metrics = Arc::new(Metrics::new());
    let datapath = Arc::new(Datapath::init(
        config.offload,
        config.handoff,
        config.log_level,
        config.max_buffered,
        Arc::new(Drain::default()),
    )?);
    metrics.set_offload_mode(datapath.mode());
    if let Some(addr) = config.metrics {
        let socket = metrics_endpoint::bind(addr).await?;
        log::info!("metrics: serving Prometheus text at http://{}/metrics", socket.local_addr()?);
        tokio::spawn(metrics_endpoint::serve(socket, metrics.clone(), datapath.clone()));
    }
    let drain_timeout = config.drain_timeout;
    // Signals first: SIGHUP's default action would end the process while
    // names resolve. Upstream names resolve before anything listens.
    let mut signals = Signals::new()?;
    let mut names = None;
    let expanded = expand(&mut names, &config, &metrics).await?;
    let mut base = config;
    let mut server = server::Server::start(expanded, datapath, metrics.clone())?;
    tokio::spawn(trim_heap(metrics.clone()));
    loop {
        let due = names.as_ref().and_then(resolve::Names::next_due);
        tokio::select! {
            signal = signals.next() => {
                if signal == Signal::Stop {
                    break;
                }
                let Some(source) = &reload else {
                    log::warn!("SIGHUP: splicer was started with flags, not --config: nothing to reload");
                    continue;
                };
                let result = match source.load() {
                    Ok(new) => match expand(&mut names, &new, &metrics).await {
                        Ok(expanded) => server.reload(expanded).map(|()| base = new),
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                };
                metrics.reload(result.is_ok());
                match result {
                    Ok(()) => log::info!("reload: {} applied", source.path.display()),
                    Err(e) => log::error!("reload refused, the running configuration stays: {e:#}"),
                }
            }
            () = tokio::time::sleep(due.unwrap_or_default()), if due.is_some() => {
                // Names asked again: a change of addresses reloads the
                // listeners that have them, as SIGHUP would.
                match expand(&mut names, &base, &metrics).await {
                    Ok(expanded) if expanded != *server.config() => match server.reload(expanded) {
                        Ok(()) => log::info!("upstream names: the addresses changed; listeners updated"),
                        Err(e) => log::error!("upstream names: the addresses changed, but: {e:#}"),
                    },
                    Ok(_) => {}
                    Err(e) => log::warn!("upstream names: {e:#}"),
                }
            }
        }
    }
    server.drain(drain_timeout).await;
    log::info!("stopping: {}", metrics.totals().summary());
    Ok(())
}

/// `config` with its upstream names resolved (none: as it is). The
/// resolver is made the first time a configuration has a name.
async fn expand(names: &mut Option<resolve::Names>, config: &Config, metrics: &Metrics) -> Result<Config> {
    if config.listeners.iter().all(|l| l.names.is_empty()) {
        return Ok(config.clone());
    }
    let names = match names {
        Some(n) => n,
        None => names.insert(resolve::Names::new(config)?),
    };
    names.expand(config, metrics).await
}

/// Each client costs two fds (client and upstream). Many systems start
/// processes with a soft limit of 1024; take what the hard limit allows.
#[allow(unsafe_code)] // getrlimit/setrlimit have no safe wrapper in std
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let old = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) == 0 {
                log::debug!("open files limit raised from {old} to {}", lim.rlim_cur);
            }
        }
    }
}

/// One malloc arena for the whole process instead of glibc's one per
/// thread that contends. Connection state is allocated on one runtime
/// thread and often freed on another, and with an arena per thread the
/// freed memory stayed spread over pages `malloc_trim` could not return:
/// 1,000 idle connections handed to the kernel by `--handoff auto` cost
/// 1,605 bytes each in RSS, against 344 with one arena (measured by hand,
/// as the bench's idle step does). Blocks up to about 1 KiB still come from
/// each thread's cache without the arena's lock; larger ones (a task, a
/// relay's leftover when its destination is full) share the lock, which
/// costs little with one runtime thread per core on small machines. An
/// operator's own `MALLOC_ARENA_MAX` or `GLIBC_TUNABLES` wins. Called
/// before any thread starts.
#[allow(unsafe_code)] // mallopt is glibc's, with no safe wrapper
pub fn one_heap() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() || std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    // SAFETY: mallopt sets a tunable; no pointers involved.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

/// A reconnect storm leaves the heap as large as its peak (glibc returns
/// freed memory in the middle of an arena only on malloc_trim). Once
/// connections have come and gone, hand the free pages back, so an idle
/// node's RSS is what its live connections need, not its worst minute.
#[allow(unsafe_code)] // malloc_trim is glibc's, with no safe wrapper
async fn trim_heap(metrics: Arc<Metrics>) {
    let mut seen = (0, 0);
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        // New connections, or connections handed to the kernel (whose
        // userspace task and buffers are then freed, as with `--handoff
        // auto`), leave freed heap behind.
        let t = metrics.totals();
        let now = (t.accepted(), t.spliced());
        if now != seen {
            seen = now;
            // SAFETY: malloc_trim only releases free memory; no pointers involved.
            unsafe { libc::malloc_trim(0) };
        }
    }
}

#[derive(PartialEq)]
enum Signal {
    Reload,
    Stop,
}

struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.hup.recv() => Signal::Reload,
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
        }
    }
}
