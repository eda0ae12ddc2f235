//! splicer: accepts MQTT clients, connects each to an upstream broker, tells
//! the broker who the client is (PROXY protocol), and lets an eBPF sockmap
//! program carry the bytes from then on.
mod accept_proxy;
mod balance;
mod cli;
mod config;
mod conn;
mod ebpf_maps;
mod http_upgrade;
mod listener;
mod metrics;
mod offload;
mod peek;
mod proxy_protocol;
mod realip;
mod relay;
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
        .block_on(run(config))
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

async fn run(config: config::Config) -> Result<()> {
    raise_fd_limit();
    let offload = Arc::new(offload::Offload::init(config.offload, config.log_level)?);
    let mut bound = Vec::new();
    for l in &config.listeners {
        let ctx = conn::ListenerCtx {
            trusted: trust::Trusted::new(&l.trusted_proxies),
            balancer: balance::RoundRobin::new(l.upstreams.clone()),
            config: l.clone(),
            offload: offload.clone(),
        };
        let listener = listener::bind(&ctx)?;
        log::info!(
            "[{}] listening on {} -> {} (send-proxy {:?}, accept-proxy {:?}{})",
            l.name,
            listener.local_addr()?,
            l.upstreams
                .iter()
                .map(|u| u.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            l.send_proxy,
            l.accept_proxy,
            if l.proxy_passthrough {
                ", passthrough"
            } else {
                ""
            }
        );
        bound.push((Arc::new(ctx), listener));
    }
    for (ctx, listener) in bound {
        tokio::spawn(listener::serve(ctx, listener));
    }
    wait_for_stop().await;
    log::info!("stopping: {}", metrics::COUNTERS.summary());
    Ok(())
}

async fn wait_for_stop() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
