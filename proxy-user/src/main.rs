//! splicer: accepts MQTT clients, connects each to an upstream broker, tells
//! the broker who the client is (PROXY protocol), and lets an eBPF sockmap
//! program carry the bytes from then on.
mod access;
mod accept_proxy;
mod balance;
mod cli;
mod config;
mod conn;
mod ebpf_maps;
mod health;
mod http_upgrade;
mod listener;
mod metrics;
mod metrics_server;
mod offload;
mod park;
mod peek;
mod proxy_protocol;
mod realip;
mod relay;
mod server;
mod shutdown;
mod sockopt;
mod splice;
mod trust;
mod watch;
mod ws;

use std::sync::Arc;

use anyhow::Result;
use clap::Parser;

fn main() -> Result<()> {
    let cli = cli::Cli::parse();
    let check = cli.check;
    let reload = cli.reload_source();
    let config = match cli.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("splicer: {e:#}");
            std::process::exit(2);
        }
    };
    if check {
        println!("configuration ok: {config:#?}");
        return Ok(());
    }
    // Our own modules (and the kernel program's records) at the configured
    // level; libraries only from warn up, so debug stays readable.
    env_logger::Builder::new()
        .filter_level(config.log_level.min(log::LevelFilter::Warn))
        .filter_module("splicer", config.log_level)
        .filter_module("proxy_ebpf", config.log_level)
        .format_timestamp_millis()
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(config, reload))
}

/// Each client costs two fds (client and upstream). Many systems start
/// processes with a soft limit of 1024; take what the hard limit allows.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let old = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                log::debug!("open files limit raised from {old} to {}", lim.rlim_cur);
            }
        }
    }
}

async fn run(config: config::Config, reload: Option<cli::ReloadSource>) -> Result<()> {
    raise_fd_limit();
    park::init();
    let offload = Arc::new(offload::Offload::init(config.offload, config.log_level)?);
    metrics::METRICS.set_offload_mode(match offload.maps() {
        Some(_) => "sockmap",
        None => "userspace",
    });
    if let Some(addr) = config.metrics {
        let socket = metrics_server::bind(addr).await?;
        log::info!("metrics: serving Prometheus text at http://{}/metrics", socket.local_addr()?);
        tokio::spawn(metrics_server::serve(socket, offload.clone()));
    }
    let drain_timeout = config.drain_timeout;
    let mut server = server::Server::start(config, offload)?;
    tokio::spawn(trim_heap());
    let mut signals = Signals::new()?;
    while signals.next().await == Signal::Reload {
        let Some(source) = &reload else {
            log::warn!("SIGHUP: splicer was started with flags, not --config: nothing to reload");
            continue;
        };
        let result = source.load().and_then(|c| server.reload(c));
        metrics::METRICS.reload(result.is_ok());
        match result {
            Ok(()) => log::info!("reload: {} applied", source.path.display()),
            Err(e) => log::error!("reload refused, the running configuration stays: {e:#}"),
        }
    }
    server.drain(drain_timeout).await;
    log::info!("stopping: {}", metrics::COUNTERS.summary());
    Ok(())
}

/// A reconnect storm leaves the heap as large as its peak (glibc returns
/// freed memory in the middle of an arena only on malloc_trim). Once
/// connections have come and gone, hand the free pages back, so an idle
/// node's RSS is what its live connections need, not its worst minute.
async fn trim_heap() {
    let mut seen = 0;
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        let now = metrics::COUNTERS.accepted.load(std::sync::atomic::Ordering::Relaxed);
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
