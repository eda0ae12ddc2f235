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

use tokio::{net::TcpStream, sync::watch};

use crate::{
    accept_proxy::{self, Rejection},
    access::Access,
    balance::Balancer,
    config::{HealthCheck, Listener},
    health::UpstreamState,
    http_upgrade::Refusal,
    metrics::{self, CloseReason, ListenerMetrics, Path, Reject},
    offload::Offload,
    park,
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
                if config.health.check == HealthCheck::Off {
                    state.force_up();
                }
                (state, u.weight)
            })
            .collect();
        // Upstreams no longer listed leave /metrics.
        for old in previous.iter().flat_map(|p| p.balancer.upstreams()) {
            if !config.upstreams.iter().any(|u| u.addr == old.addr) {
                metrics::METRICS.forget_upstream(&config.name, &old.addr.to_string());
            }
        }
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
    if let Some(reason) = serve(&ctx, client, peer).await {
        ctx.metrics.closed(reason);
    }
}

/// None when the connection ends up parked (park.rs closes and counts it).
async fn serve(ctx: &Arc<ListenerCtx>, client: TcpStream, peer: SocketAddr) -> Option<CloseReason> {
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
            return Some(CloseReason::rejected);
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
        return Some(CloseReason::error);
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
                return Some(CloseReason::rejected);
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
        return Some(CloseReason::rejected);
    }
    let Some((upstream, state)) = connect_upstream(ctx, id.client).await else {
        m.rejected(Reject::upstream_down);
        log::warn!("[{name}] {who}: every upstream is down, closing the client");
        refuse(ctx, &client, Refusal::BadGateway).await;
        return Some(CloseReason::rejected);
    };
    state.metrics.active.inc();
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let mut bytes = accept_proxy::upstream_header(&ctx.config, &id, local).unwrap_or_default();
    bytes.extend_from_slice(&head);
    let conn = Conn {
        ctx,
        started,
        peer,
        client: id.client,
        upstream: &state,
    };
    let t = match proxy(&conn, Preface { bytes, consumed }, client, upstream).await {
        Ok(Some(t)) => t,
        Ok(None) => return None,
        Err(e) => {
            log::warn!("[{name}] {who} -> {}: {e:#}", state.addr);
            Totals {
                how: "error",
                ..Totals::default()
            }
        }
    };
    closed(ctx, peer, id.client, &state, &t, started.elapsed());
    None
}

/// Logs a connection's close line and counts its end.
pub fn closed(
    ctx: &ListenerCtx,
    peer: SocketAddr,
    client: SocketAddr,
    upstream: &UpstreamState,
    t: &Totals,
    duration: std::time::Duration,
) {
    upstream.metrics.active.dec();
    let who = match client == peer {
        true => format!("client={peer}"),
        false => format!("client={client} via={peer}"),
    };
    log::info!(
        "[{}] closed {who} upstream={} client_to_upstream={} upstream_to_client={} \
         kernel_bytes={} duration={:.3}s end={}",
        ctx.config.name,
        upstream.addr,
        t.c2u,
        t.u2c,
        t.kernel,
        duration.as_secs_f64(),
        t.how
    );
    ctx.metrics.closed(match t.how {
        "client closed" => CloseReason::client_closed,
        "upstream closed" => CloseReason::upstream_closed,
        "client reset" => CloseReason::client_reset,
        "upstream reset" => CloseReason::upstream_reset,
        DRAINED => CloseReason::drained,
        _ => CloseReason::error,
    });
}

/// Who a connection is, for its close line and its parking.
struct Conn<'a> {
    ctx: &'a Arc<ListenerCtx>,
    started: Instant,
    /// The TCP peer, and the real client behind it.
    peer: SocketAddr,
    client: SocketAddr,
    upstream: &'a Arc<UpstreamState>,
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
pub struct Totals {
    pub c2u: u64,
    pub u2c: u64,
    /// Of those, bytes the kernel redirected (never seen by userspace).
    pub kernel: u64,
    pub how: &'static str,
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

/// Ok(None): the connection is parked (park.rs carries on with it).
async fn proxy(
    conn: &Conn<'_>,
    preface: Preface,
    client: TcpStream,
    upstream: TcpStream,
) -> anyhow::Result<Option<Totals>> {
    let ctx = conn.ctx;
    relay::write_all(&upstream, &preface.bytes).await?;
    // Once userspace has read from the client, it also forwards whatever
    // else is queued (see relay::forward_queued), so that the kernel only
    // ever gets untouched skbs. `consumed` then covers every byte userspace
    // took, so the FIN check knows all later ones went through the kernel.
    let mut c2u_early = 0;
    if preface.consumed > 0 {
        c2u_early = relay::forward_queued(&client, &upstream).await?;
        ctx.metrics.user_bytes(C2U).inc_by(c2u_early);
    }
    let Some(maps) = ctx.offload.maps() else {
        ctx.metrics.offloaded(Path::userspace);
        return Ok(Some(relayed(ctx, &client, &upstream, c2u_early).await));
    };
    let token = park::token();
    let handoff = splice::handoff(maps, &client, &upstream, token);
    let Some((c, u)) = handoff.cookies else {
        park::release(token);
        ctx.metrics.offloaded(Path::userspace);
        return Ok(Some(relayed(ctx, &client, &upstream, c2u_early).await));
    };
    if handoff.client_spliced && handoff.upstream_spliced {
        // The kernel carries both ways: park it, with no task at all.
        ctx.metrics.offloaded(Path::kernel);
        let spliced = park::Spliced::new(
            token,
            client,
            upstream,
            &handoff,
            (preface.consumed, c2u_early),
            conn.started,
            (conn.peer, conn.client),
            ctx.clone(),
            conn.upstream.clone(),
        );
        match spliced.and_then(|s| park::start(token, s)) {
            Ok(()) => return Ok(None),
            Err(e) => {
                // The sockets are gone with the error; nothing to relay.
                splice::forget(maps, (c, u));
                park::release(token);
                return Err(e.into());
            }
        }
    }
    // One side half-closed before the handoff: the kernel carries the
    // other direction, userspace this one, in this task.
    ctx.metrics.offloaded(Path::userspace);
    let mut wake = park::waiter(token);
    let watcher = Watcher::get()?;
    watcher.add(client.as_raw_fd(), token)?;
    watcher.add(upstream.as_raw_fd(), token)?;
    let (c2u_user, u2c_user) = (AtomicU64::new(c2u_early), AtomicU64::new(0));
    let consumed = preface.consumed + c2u_early;
    let kernel_c2u = Direction::new(maps, client.as_fd(), upstream.as_fd(), c, handoff.upstream_base)
        .consumed(consumed);
    let kernel_u2c = Direction::new(maps, upstream.as_fd(), client.as_fd(), u, handoff.client_base);
    let (w1, w2, w3) = (wake.clone(), wake.clone(), wake.clone());
    let how = drive(
        async {
            match handoff.client_spliced {
                true => kernel_direction(&kernel_c2u, w1).await,
                false => relay::user_direction(&client, &upstream, &c2u_user, user_bytes(ctx, C2U)).await,
            }
        },
        async {
            match handoff.upstream_spliced {
                true => kernel_direction(&kernel_u2c, w2).await,
                false => relay::user_direction(&upstream, &client, &u2c_user, user_bytes(ctx, U2C)).await,
            }
        },
        reset_after_fin(&client, handoff.client_spliced, w3),
        reset_after_fin(&upstream, handoff.upstream_spliced, {
            wake.mark_unchanged();
            wake
        }),
    )
    .await;
    abort_if_reset(how, &client, &upstream);
    watcher.remove(client.as_raw_fd());
    watcher.remove(upstream.as_raw_fd());
    drop((client, upstream));
    // Both sockets are closed (so out of the sockhashes) before their links go.
    let (c_link, u_link) = splice::forget(maps, (c, u));
    park::release(token);
    ctx.metrics.kernel.add_closed(c_link.redirected, u_link.redirected);
    Ok(Some(Totals {
        c2u: c2u_user.load(Relaxed) + c_link.redirected,
        u2c: u2c_user.load(Relaxed) + u_link.redirected,
        kernel: c_link.redirected + u_link.redirected,
        how,
    }))
}

/// A kernel-carried direction in a task: looks at it after every wake-up.
async fn kernel_direction(d: &Direction<'_>, mut wake: watch::Receiver<()>) -> End {
    loop {
        if let Some(end) = d.advance().await {
            return end;
        }
        if wake.changed().await.is_err() {
            return End::DstFailed;
        }
    }
}

/// Resolves if `sock` is reset after its FIN was passed on.
async fn reset_after_fin(sock: &TcpStream, spliced: bool, mut wake: watch::Receiver<()>) -> End {
    if !spliced {
        return relay::wait_reset(sock).await;
    }
    loop {
        if splice::was_reset(sock.as_fd()) {
            return End::SrcReset;
        }
        if wake.changed().await.is_err() {
            return End::SrcReset;
        }
    }
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
pub fn abort_if_reset(how: &str, client: &impl AsFd, upstream: &impl AsFd) {
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
pub const DRAINED: &str = "drained";

const C2U: metrics::Direction = metrics::Direction::client_to_upstream;
const U2C: metrics::Direction = metrics::Direction::upstream_to_client;

fn user_bytes(ctx: &ListenerCtx, d: metrics::Direction) -> &prometheus_client::metrics::counter::Counter {
    ctx.metrics.user_bytes(d)
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
        if let Some(how) = outcome(c2u_end, u2c_end, first_fin.unwrap_or("closed")) {
            return how;
        }
    }
}

/// How a connection ended, once it has: a reset anywhere ends both
/// directions; otherwise both must have ended, and `first` says which
/// side closed first.
pub fn outcome(c2u: Option<End>, u2c: Option<End>, first: &'static str) -> Option<&'static str> {
    match (c2u, u2c) {
        (Some(End::SrcReset), _) | (_, Some(End::DstFailed)) => Some("client reset"),
        (Some(End::DstFailed), _) | (_, Some(End::SrcReset)) => Some("upstream reset"),
        (Some(_), Some(_)) => Some(first),
        _ => None,
    }
}
