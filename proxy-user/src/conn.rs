//! One client connection from accept to close: pick and connect an upstream,
//! write the PROXY header, hand the sockets to the kernel (or the relay),
//! pass half-closes and resets on, and log one line at the end.
use std::{
    future::Future,
    net::SocketAddr,
    sync::{atomic::AtomicU64, atomic::Ordering::Relaxed, Arc},
    time::Instant,
};

use tokio::net::TcpStream;

use crate::{
    balance::RoundRobin,
    config::Listener,
    metrics::{dec, inc, COUNTERS},
    offload::Offload,
    proxy_protocol,
    relay::{self, End},
    splice::{self, Handoff},
};

/// What a listener's connections share.
pub struct ListenerCtx {
    pub config: Listener,
    pub balancer: RoundRobin,
    pub offload: Arc<Offload>,
}

pub async fn handle(ctx: Arc<ListenerCtx>, client: TcpStream, peer: SocketAddr) {
    inc(&COUNTERS.accepted);
    inc(&COUNTERS.active);
    let started = Instant::now();
    let name = &ctx.config.name;
    let Some((upstream, upstream_addr)) = connect_upstream(&ctx).await else {
        inc(&COUNTERS.upstream_down);
        log::warn!("[{name}] {peer}: every upstream is down, closing the client");
        dec(&COUNTERS.active);
        inc(&COUNTERS.closed);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (c2u, u2c, how) = match proxy(&ctx, &client, &upstream, peer).await {
        Ok(r) => r,
        Err(e) => {
            log::warn!("[{name}] {peer} -> {upstream_addr}: {e:#}");
            (0, 0, "error")
        }
    };
    drop(client);
    drop(upstream);
    dec(&COUNTERS.active);
    inc(&COUNTERS.closed);
    log::info!(
        "[{name}] closed client={peer} upstream={upstream_addr} client_to_upstream={c2u} upstream_to_client={u2c} duration={:.3}s end={how}",
        started.elapsed().as_secs_f64()
    );
}

/// Tries each upstream once, in round-robin order, within connect-timeout.
async fn connect_upstream(ctx: &ListenerCtx) -> Option<(TcpStream, SocketAddr)> {
    let timeout = ctx.config.connect_timeout;
    for addr in ctx.balancer.candidates() {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => return Some((s, addr)),
            Ok(Err(e)) => log::warn!("[{}] upstream {addr}: connect failed: {e}", ctx.config.name),
            Err(_) => log::warn!("[{}] upstream {addr}: connect timed out after {timeout:?}", ctx.config.name),
        }
        inc(&COUNTERS.upstream_connect_failed);
    }
    None
}

/// Forwards until both directions are closed or one side resets.
/// Returns bytes client->upstream, upstream->client, and how it ended.
async fn proxy(
    ctx: &ListenerCtx,
    client: &TcpStream,
    upstream: &TcpStream,
    peer: SocketAddr,
) -> anyhow::Result<(u64, u64, &'static str)> {
    if let Some(version) = ctx.config.send_proxy.version() {
        let header = proxy_protocol::build(version, peer, client.local_addr()?);
        relay::write_all(upstream, &header).await?;
    }

    let maps = ctx.offload.maps();
    let handoff = maps.map_or_else(Handoff::default, |m| splice::handoff(m, client, upstream));
    if handoff.client_spliced && handoff.upstream_spliced {
        inc(&COUNTERS.spliced);
    } else {
        inc(&COUNTERS.relayed);
    }
    let (c2u_user, u2c_user) = (AtomicU64::new(0), AtomicU64::new(0));
    let c2u = async {
        match (maps, handoff.cookies) {
            (Some(m), Some((c, _))) if handoff.client_spliced => {
                splice::kernel_direction(m, client, upstream, c, 0, handoff.upstream_base).await
            }
            _ => relay::user_direction(client, upstream, &c2u_user).await,
        }
    };
    let u2c = async {
        match (maps, handoff.cookies) {
            (Some(m), Some((_, u))) if handoff.upstream_spliced => {
                splice::kernel_direction(m, upstream, client, u, 0, handoff.client_base).await
            }
            _ => relay::user_direction(upstream, client, &u2c_user).await,
        }
    };
    let how = drive(client, upstream, c2u, u2c).await;

    let (c_link, u_link) = match (maps, handoff.cookies) {
        (Some(m), Some(cookies)) => splice::forget(m, cookies),
        _ => Default::default(),
    };
    Ok((c2u_user.load(Relaxed) + c_link.redirected, u2c_user.load(Relaxed) + u_link.redirected, how))
}

/// Runs both directions. A FIN in one direction leaves the other running
/// (half-close); a reset anywhere resets the other side and ends both.
async fn drive(
    client: &TcpStream,
    upstream: &TcpStream,
    c2u: impl Future<Output = End>,
    u2c: impl Future<Output = End>,
) -> &'static str {
    tokio::pin!(c2u, u2c);
    let (mut c2u_end, mut u2c_end) = (None, None);
    let mut first_fin = None;
    loop {
        tokio::select! {
            e = &mut c2u, if c2u_end.is_none() => {
                c2u_end = Some(e);
                first_fin.get_or_insert("client closed");
            }
            e = &mut u2c, if u2c_end.is_none() => {
                u2c_end = Some(e);
                first_fin.get_or_insert("upstream closed");
            }
            // Once a side's FIN is passed on, only its reset still matters.
            e = relay::wait_reset(client), if c2u_end == Some(End::Fin) && u2c_end.is_none() => c2u_end = Some(e),
            e = relay::wait_reset(upstream), if u2c_end == Some(End::Fin) && c2u_end.is_none() => u2c_end = Some(e),
        }
        let reset = match (c2u_end, u2c_end) {
            (Some(End::SrcReset), _) | (_, Some(End::DstFailed)) => Some("client reset"),
            (Some(End::DstFailed), _) | (_, Some(End::SrcReset)) => Some("upstream reset"),
            _ => None,
        };
        if let Some(how) = reset {
            // Pass the reset on: both sockets close with RST.
            relay::abort_on_close(client);
            relay::abort_on_close(upstream);
            return how;
        }
        if c2u_end.is_some() && u2c_end.is_some() {
            return first_fin.unwrap_or("closed");
        }
    }
}
