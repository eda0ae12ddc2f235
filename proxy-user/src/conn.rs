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
    accept_proxy::{self, Rejection},
    access::Access,
    balance::Balancer,
    config::Listener,
    health::UpstreamState,
    http_upgrade::Refusal,
    metrics::{self, CloseReason, ListenerMetrics, Path, Reject, LIVE},
    offload::Offload,
    relay::{self, End},
    shutdown,
    splice::{self, Direction},
    trust::{self, Trusted},
    watch::Watcher,
    ws,
};

/// What a listener's connections share. A reload builds a new one; live
/// connections keep the one they started with.
pub struct ListenerCtx {
    pub config: Listener,
    pub trusted: Trusted,
    pub access: Access,
    pub balancer: Balancer,
    pub offload: Arc<Offload>,
    pub metrics: ListenerMetrics,
}

impl ListenerCtx {
    /// `previous` is the same listener before a reload: upstreams it
    /// already had keep their health state and connection counts.
    pub fn new(config: Listener, offload: Arc<Offload>, previous: Option<&ListenerCtx>) -> Self {
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| {
                let state = previous
                    .and_then(|p| p.balancer.upstreams().find(|s| s.addr == u.addr).cloned())
                    .unwrap_or_else(|| {
                        let m = metrics::METRICS.upstream(&config.name, &u.addr.to_string());
                        Arc::new(UpstreamState::new(&config.name, u.addr, m))
                    });
                (state, u.weight)
            })
            .collect();
        ListenerCtx {
            trusted: Trusted::new(&config.trusted_proxies),
            access: Access::new(&config.allow, &config.deny),
            balancer: Balancer::new(config.balance, upstreams),
            metrics: ListenerMetrics::new(&config.name),
            offload,
            config,
        }
    }
}

/// Serves one accepted client; the accept loop has counted it.
pub async fn handle(ctx: Arc<ListenerCtx>, client: TcpStream, peer: SocketAddr) {
    let reason = serve(&ctx, client, peer).await;
    ctx.metrics.closed(reason);
}

async fn serve(ctx: &ListenerCtx, client: TcpStream, peer: SocketAddr) -> CloseReason {
    let started = Instant::now();
    // An IPv4 client on a dual-stack listener is logged as IPv4, as trusted.
    let peer = SocketAddr::new(trust::canonical(peer.ip()), peer.port());
    let name = &ctx.config.name;
    let m = &ctx.metrics;
    let mut id = match accept_proxy::identify(&ctx.config, &ctx.trusted, &client, peer).await {
        Ok(id) => id,
        Err(why) => {
            m.rejected(match why {
                Rejection::Untrusted => Reject::untrusted_proxy_header,
                _ => Reject::bad_proxy_header,
            });
            log::warn!("[{name}] {peer}: rejected: {why}");
            return CloseReason::rejected;
        }
    };
    if let (Some((h, _)), false) = (&id.inbound, id.trusted) {
        m.untrusted_ignored();
        log::warn!(
            "[{name}] {peer}: PROXY header from an untrusted peer ignored (it claimed {}); using the peer's address",
            h.addresses.map_or("no address".into(), |(src, _)| src.to_string())
        );
    }
    let Ok(local) = client.local_addr() else {
        return CloseReason::error;
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
                m.rejected(Reject::bad_websocket_request);
                log::warn!(
                    "[{name}] {peer}: refused WebSocket upgrade ({}): {refusal:?}",
                    refusal.status()
                );
                return CloseReason::rejected;
            }
        }
    }
    // Which client this is, for logs: the real one, and the hop if different.
    let who = match id.client == peer {
        true => format!("client={peer}"),
        false => format!("client={} via={peer}", id.client),
    };
    if !ctx.access.permits(id.client.ip()) {
        m.rejected(Reject::access_denied);
        log::warn!("[{name}] {who}: access denied (allow/deny)");
        refuse(ctx, &client, Refusal::Forbidden).await;
        return CloseReason::rejected;
    }
    let Some((upstream, state)) = connect_upstream(ctx, id.client).await else {
        m.rejected(Reject::upstream_down);
        log::warn!("[{name}] {who}: every upstream is down, closing the client");
        refuse(ctx, &client, Refusal::BadGateway).await;
        return CloseReason::rejected;
    };
    let upstream_addr = state.addr;
    state.metrics.active.inc();
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
    state.metrics.active.dec();
    log::info!(
        "[{name}] closed {who} upstream={upstream_addr} client_to_upstream={} upstream_to_client={} \
         kernel_bytes={} duration={:.3}s end={}",
        t.c2u,
        t.u2c,
        t.kernel,
        started.elapsed().as_secs_f64(),
        t.how
    );
    match t.how {
        "client closed" => CloseReason::client_closed,
        "upstream closed" => CloseReason::upstream_closed,
        "client reset" => CloseReason::client_reset,
        "upstream reset" => CloseReason::upstream_reset,
        DRAINED => CloseReason::drained,
        _ => CloseReason::error,
    }
}

/// A WebSocket client gets an HTTP answer before the close; a TCP client
/// just the close.
async fn refuse(ctx: &ListenerCtx, client: &TcpStream, refusal: Refusal) {
    if ctx.config.ws.is_some() {
        ws::refuse(client, &refusal).await;
    }
}

/// Tries the balancer's candidates in order, each within connect-timeout.
/// Failures count toward the upstream's `fall` (passive health check).
async fn connect_upstream(
    ctx: &ListenerCtx,
    client: SocketAddr,
) -> Option<(TcpStream, Arc<UpstreamState>)> {
    let timeout = ctx.config.connect_timeout;
    let name = &ctx.config.name;
    for up in ctx.balancer.candidates(client.ip()) {
        let started = Instant::now();
        let why = match tokio::time::timeout(timeout, TcpStream::connect(up.addr)).await {
            Ok(Ok(s)) => {
                up.metrics.connect.observe(started.elapsed().as_secs_f64());
                up.report(&ctx.config.health, Ok(()));
                return Some((s, up));
            }
            Ok(Err(e)) => format!("connect failed: {e}"),
            Err(_) => format!("connect timed out after {timeout:?}"),
        };
        log::warn!("[{name}] upstream {}: {why}", up.addr);
        up.metrics.failures.inc();
        up.report(&ctx.config.health, Err(why));
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
        user_bytes(ctx, C2U).inc_by(c2u_early);
        consumed = preface.consumed + c2u_early;
    }
    let Some(maps) = ctx.offload.maps() else {
        ctx.metrics.offloaded(Path::userspace);
        return Ok(relayed(ctx, &client, &upstream, c2u_early).await);
    };
    let handoff = splice::handoff(maps, &client, &upstream);
    let (Some((c, u)), Some(signals)) = (handoff.cookies, &handoff.signals) else {
        ctx.metrics.offloaded(Path::userspace);
        return Ok(relayed(ctx, &client, &upstream, c2u_early).await);
    };
    LIVE.track((c, u), &ctx.metrics);
    let watcher = Watcher::get()?;
    // Bytes relayed in userspace; the kernel's own count is in the links.
    let (c2u_user, u2c_user) = (AtomicU64::new(c2u_early), AtomicU64::new(0));
    let how = if handoff.client_spliced && handoff.upstream_spliced {
        ctx.metrics.offloaded(Path::kernel);
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
        ctx.metrics.offloaded(Path::userspace);
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
                false => relay::user_direction(&client, &upstream, &c2u_user, user_bytes(ctx, C2U)).await,
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
                false => relay::user_direction(&upstream, &client, &u2c_user, user_bytes(ctx, U2C)).await,
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
    LIVE.finish(c, (c_link.redirected, u_link.redirected));
    Ok(Totals {
        c2u: c2u_user.load(Relaxed) + c_link.redirected,
        u2c: u2c_user.load(Relaxed) + u_link.redirected,
        kernel: c_link.redirected + u_link.redirected,
        how,
    })
}

/// Both directions relayed in userspace; `c2u_early` bytes already were.
async fn relayed(ctx: &ListenerCtx, client: &TcpStream, upstream: &TcpStream, c2u_early: u64) -> Totals {
    let (c2u, u2c) = (AtomicU64::new(c2u_early), AtomicU64::new(0));
    let how = drive(
        relay::user_direction(client, upstream, &c2u, user_bytes(ctx, C2U)),
        relay::user_direction(upstream, client, &u2c, user_bytes(ctx, U2C)),
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
/// At the end of a drain, both get a FIN now, whatever they were doing.
fn abort_if_reset(how: &str, client: &impl AsFd, upstream: &impl AsFd) {
    if how.ends_with("reset") {
        relay::abort_on_close(client);
        relay::abort_on_close(upstream);
    }
    if how == DRAINED {
        for s in [client.as_fd(), upstream.as_fd()] {
            let _ = socket2::SockRef::from(&s).shutdown(std::net::Shutdown::Write);
        }
    }
}

/// The close line's `end=` when a SIGTERM drain ran out of time.
const DRAINED: &str = "drained";

const C2U: metrics::Direction = metrics::Direction::client_to_upstream;
const U2C: metrics::Direction = metrics::Direction::upstream_to_client;

fn user_bytes(ctx: &ListenerCtx, d: metrics::Direction) -> &prometheus_client::metrics::counter::Counter {
    ctx.metrics.bytes(d, Path::userspace)
}

/// Runs both directions. A FIN in one direction leaves the other running
/// (half-close); a reset anywhere ends both. `*_reset` resolve if that
/// side is reset after its FIN was passed on. A drain that runs out of
/// time ends both.
async fn drive(
    c2u: impl Future<Output = End>,
    u2c: impl Future<Output = End>,
    client_reset: impl Future<Output = End>,
    upstream_reset: impl Future<Output = End>,
) -> &'static str {
    let drained = shutdown::forced();
    tokio::pin!(c2u, u2c, client_reset, upstream_reset, drained);
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
            () = &mut drained => return DRAINED,
        }
        match (c2u_end, u2c_end) {
            (Some(End::SrcReset), _) | (_, Some(End::DstFailed)) => return "client reset",
            (Some(End::DstFailed), _) | (_, Some(End::SrcReset)) => return "upstream reset",
            (Some(_), Some(_)) => return first_fin.unwrap_or("closed"),
            _ => {}
        }
    }
}
