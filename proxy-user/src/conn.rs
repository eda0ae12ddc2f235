//! One client connection from accept to close: pick and connect an upstream,
//! write the PROXY header, hand the sockets to the kernel (or the relay),
//! pass half-closes and resets on, and log one line at the end.
use std::{
    future::Future,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd},
    sync::{atomic::AtomicU64, atomic::Ordering::Relaxed, Arc},
    time::Instant,
};

use tokio::net::TcpStream;

use crate::{
    accept_proxy,
    balance::RoundRobin,
    config::Listener,
    metrics::{dec, inc, COUNTERS},
    offload::Offload,
    relay::{self, End},
    splice::{self, Direction},
    trust::{self, Trusted},
    watch::Watcher,
    ws,
};

/// What a listener's connections share.
pub struct ListenerCtx {
    pub config: Listener,
    pub trusted: Trusted,
    pub balancer: RoundRobin,
    pub offload: Arc<Offload>,
}

pub async fn handle(ctx: Arc<ListenerCtx>, client: TcpStream, peer: SocketAddr) {
    inc(&COUNTERS.accepted);
    inc(&COUNTERS.active);
    serve(&ctx, client, peer).await;
    dec(&COUNTERS.active);
    inc(&COUNTERS.closed);
}

async fn serve(ctx: &ListenerCtx, client: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    // An IPv4 client on a dual-stack listener is logged as IPv4, as trusted.
    let peer = SocketAddr::new(trust::canonical(peer.ip()), peer.port());
    let name = &ctx.config.name;
    let mut id = match accept_proxy::identify(&ctx.config, &ctx.trusted, &client, peer).await {
        Ok(id) => id,
        Err(why) => {
            inc(&COUNTERS.proxy_rejected);
            log::warn!("[{name}] {peer}: rejected: {why}");
            return;
        }
    };
    if let (Some((h, _)), false) = (&id.inbound, id.trusted) {
        inc(&COUNTERS.proxy_untrusted);
        log::warn!(
            "[{name}] {peer}: PROXY header from an untrusted peer ignored (it claimed {}); using the peer's address",
            h.addresses.map_or("no address".into(), |(src, _)| src.to_string())
        );
    }
    let local = match client.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let mut consumed = id.inbound.as_ref().map_or(0, |(_, raw)| raw.len() as u64);
    let mut head = Vec::new();
    if let Some(ws) = &ctx.config.ws {
        match ws::upgrade(ws, &ctx.trusted, &client, id.client).await {
            Ok(up) => {
                // The header resolution may name an earlier client.
                id.client = SocketAddr::new(up.client, id.client.port());
                consumed += up.consumed as u64;
                head = up.head;
            }
            Err(refusal) => {
                inc(&COUNTERS.ws_refused);
                log::warn!(
                    "[{name}] {peer}: refused WebSocket upgrade ({}): {refusal:?}",
                    refusal.status()
                );
                return;
            }
        }
    }
    // Which client this is, for logs: the real one, and the hop if different.
    let who = match id.client == peer {
        true => format!("client={peer}"),
        false => format!("client={} via={peer}", id.client),
    };
    let Some((upstream, upstream_addr)) = connect_upstream(ctx).await else {
        inc(&COUNTERS.upstream_down);
        log::warn!("[{name}] {who}: every upstream is down, closing the client");
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let mut bytes = accept_proxy::upstream_header(&ctx.config, &id, local).unwrap_or_default();
    bytes.extend_from_slice(&head);
    let t = match proxy(ctx, Preface { bytes, consumed }, client, upstream).await {
        Ok(t) => t,
        Err(e) => {
            log::warn!("[{name}] {who} -> {upstream_addr}: {e:#}");
            Totals {
                how: "error",
                ..Totals::default()
            }
        }
    };
    log::info!(
        "[{name}] closed {who} upstream={upstream_addr} client_to_upstream={} upstream_to_client={} \
         kernel_bytes={} duration={:.3}s end={}",
        t.c2u,
        t.u2c,
        t.kernel,
        started.elapsed().as_secs_f64(),
        t.how
    );
}

/// Tries each upstream once, in round-robin order, within connect-timeout.
async fn connect_upstream(ctx: &ListenerCtx) -> Option<(TcpStream, SocketAddr)> {
    let timeout = ctx.config.connect_timeout;
    for addr in ctx.balancer.candidates() {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => return Some((s, addr)),
            Ok(Err(e)) => log::warn!("[{}] upstream {addr}: connect failed: {e}", ctx.config.name),
            Err(_) => log::warn!(
                "[{}] upstream {addr}: connect timed out after {timeout:?}",
                ctx.config.name
            ),
        }
        inc(&COUNTERS.upstream_connect_failed);
    }
    None
}

/// What a connection carried, for its close line.
#[derive(Default)]
struct Totals {
    c2u: u64,
    u2c: u64,
    /// Of those, bytes the kernel redirected (never seen by userspace).
    kernel: u64,
    how: &'static str,
}

/// Forwards until both directions are closed or one side resets, then
/// closes both sockets.
/// What goes upstream before the client's own bytes, and what userspace
/// has already read of the client.
struct Preface {
    /// PROXY header and/or rewritten upgrade request.
    bytes: Vec<u8>,
    /// Bytes read from the client (its PROXY header, its upgrade request).
    consumed: u64,
}

async fn proxy(
    ctx: &ListenerCtx,
    preface: Preface,
    client: TcpStream,
    upstream: TcpStream,
) -> anyhow::Result<Totals> {
    relay::write_all(&upstream, &preface.bytes).await?;
    // Once userspace has read from the client, it also forwards whatever
    // else is queued (see relay::forward_queued), so that the kernel only
    // ever gets untouched skbs. `consumed` then covers every byte userspace
    // took, so the FIN check knows all later ones went through the kernel.
    let mut consumed = 0;
    let mut c2u_early = 0;
    if preface.consumed > 0 {
        c2u_early = relay::forward_queued(&client, &upstream).await?;
        consumed = preface.consumed + c2u_early;
    }
    let Some(maps) = ctx.offload.maps() else {
        inc(&COUNTERS.relayed);
        return Ok(relayed(&client, &upstream, c2u_early).await);
    };
    let handoff = splice::handoff(maps, &client, &upstream);
    let (Some((c, u)), Some(signals)) = (handoff.cookies, &handoff.signals) else {
        inc(&COUNTERS.relayed);
        return Ok(relayed(&client, &upstream, c2u_early).await);
    };
    let watcher = Watcher::get()?;
    // Bytes relayed in userspace; the kernel's own count is in the links.
    let (c2u_user, u2c_user) = (AtomicU64::new(c2u_early), AtomicU64::new(0));
    let how = if handoff.client_spliced && handoff.upstream_spliced {
        inc(&COUNTERS.spliced);
        // The kernel carries both ways: leave tokio's epoll (which would
        // wake for every skb) and wait on the splice watcher alone.
        let (client, upstream) = (client.into_std()?, upstream.into_std()?);
        let (cw, uw) = (
            watcher.watch(client.as_raw_fd())?,
            watcher.watch(upstream.as_raw_fd())?,
        );
        let how = drive(
            Direction::new(
                maps,
                (&client, &cw, &signals.0),
                &upstream,
                handoff.upstream_base,
            )
            .consumed(consumed)
            .run(),
            Direction::new(
                maps,
                (&upstream, &uw, &signals.1),
                &client,
                handoff.client_base,
            )
            .run(),
            splice::wait_reset(&client, &cw),
            splice::wait_reset(&upstream, &uw),
        )
        .await;
        abort_if_reset(how, &client, &upstream);
        drop((cw, uw)); // deregister before the fds close and can be reused
        how
    } else {
        // One side half-closed before the handoff: the kernel carries the
        // other direction, userspace this one.
        inc(&COUNTERS.relayed);
        let (cw, uw) = (
            watcher.watch(client.as_raw_fd())?,
            watcher.watch(upstream.as_raw_fd())?,
        );
        let c2u = async {
            match handoff.client_spliced {
                true => {
                    Direction::new(
                        maps,
                        (&client, &cw, &signals.0),
                        &upstream,
                        handoff.upstream_base,
                    )
                    .consumed(consumed)
                    .run()
                    .await
                }
                false => relay::user_direction(&client, &upstream, &c2u_user).await,
            }
        };
        let u2c = async {
            match handoff.upstream_spliced {
                true => {
                    Direction::new(
                        maps,
                        (&upstream, &uw, &signals.1),
                        &client,
                        handoff.client_base,
                    )
                    .run()
                    .await
                }
                false => relay::user_direction(&upstream, &client, &u2c_user).await,
            }
        };
        let how = drive(
            c2u,
            u2c,
            relay::wait_reset(&client),
            relay::wait_reset(&upstream),
        )
        .await;
        abort_if_reset(how, &client, &upstream);
        drop((cw, uw));
        drop((client, upstream));
        how
    };
    // Both sockets are closed (so out of the sockhashes) before their links go.
    let (c_link, u_link) = splice::forget(maps, (c, u));
    Ok(Totals {
        c2u: c2u_user.load(Relaxed) + c_link.redirected,
        u2c: u2c_user.load(Relaxed) + u_link.redirected,
        kernel: c_link.redirected + u_link.redirected,
        how,
    })
}

/// Both directions relayed in userspace; `c2u_early` bytes already were.
async fn relayed(client: &TcpStream, upstream: &TcpStream, c2u_early: u64) -> Totals {
    let (c2u, u2c) = (AtomicU64::new(c2u_early), AtomicU64::new(0));
    let how = drive(
        relay::user_direction(client, upstream, &c2u),
        relay::user_direction(upstream, client, &u2c),
        relay::wait_reset(client),
        relay::wait_reset(upstream),
    )
    .await;
    abort_if_reset(how, client, upstream);
    Totals {
        c2u: c2u.load(Relaxed),
        u2c: u2c.load(Relaxed),
        kernel: 0,
        how,
    }
}

/// Passes a reset on: both sockets will close with RST instead of FIN.
fn abort_if_reset(how: &str, client: &impl AsFd, upstream: &impl AsFd) {
    if how.ends_with("reset") {
        relay::abort_on_close(client);
        relay::abort_on_close(upstream);
    }
}

/// Runs both directions. A FIN in one direction leaves the other running
/// (half-close); a reset anywhere ends both. `*_reset` resolve if that
/// side is reset after its FIN was passed on.
async fn drive(
    c2u: impl Future<Output = End>,
    u2c: impl Future<Output = End>,
    client_reset: impl Future<Output = End>,
    upstream_reset: impl Future<Output = End>,
) -> &'static str {
    tokio::pin!(c2u, u2c, client_reset, upstream_reset);
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
            e = &mut client_reset, if c2u_end == Some(End::Fin) && u2c_end.is_none() => c2u_end = Some(e),
            e = &mut upstream_reset, if u2c_end == Some(End::Fin) && c2u_end.is_none() => u2c_end = Some(e),
        }
        match (c2u_end, u2c_end) {
            (Some(End::SrcReset), _) | (_, Some(End::DstFailed)) => return "client reset",
            (Some(End::DstFailed), _) | (_, Some(End::SrcReset)) => return "upstream reset",
            (Some(_), Some(_)) => return first_fin.unwrap_or("closed"),
            _ => {}
        }
    }
}
