//! The sockmap offload for one connection: handing both sockets to the
//! kernel, and watching a kernel-carried direction for its FIN or RST.
//!
//! The traps this module is built around (Linux 6.x):
//! - A socket joins `TARGETS` (reachable by redirects) before either socket
//!   joins `SPLICED` (redirecting), so no redirect can find its peer missing.
//! - Bytes that arrived before the socket joined `SPLICED` wait in its
//!   receive queue until data-ready runs; setting SO_RCVLOWAT runs it.
//! - Redirected bytes are queued and sent asynchronously, so a FIN from one
//!   side is passed on only once the peer's send queue holds every byte that
//!   came before it (counters from the verdict program against TCP_INFO).
//! - Only ESTABLISHED sockets can join a sockmap. A side that has already
//!   half-closed stays with the userspace relay, per direction.
use std::{
    io::{self, Read as _, Write as _},
    net::Shutdown,
    os::fd::{AsFd, AsRawFd},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use tokio::net::TcpStream;

use proxy_common::Link;

use crate::{
    ebpf_maps::Maps,
    relay::End,
    sockopt,
    watch::Watch,
};

/// What the kernel now holds of a connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Handoff {
    /// Cookies (client, upstream), once both are in LINKS and TARGETS.
    pub cookies: Option<(u64, u64)>,
    /// Whether the kernel carries client->upstream, and upstream->client.
    pub client_spliced: bool,
    pub upstream_spliced: bool,
    /// Each socket's send-queue total (see `sockopt::bytes_queued_total`)
    /// just before anything was redirected to it.
    pub client_base: u64,
    pub upstream_base: u64,
}

/// Puts both sockets in the maps. Never fails: what could not be handed
/// over stays with the userspace relay, which is always correct.
pub fn handoff(maps: &Maps, client: &TcpStream, upstream: &TcpStream) -> Handoff {
    let (Ok(c), Ok(u)) = (sockopt::cookie(client.as_raw_fd()), sockopt::cookie(upstream.as_raw_fd())) else {
        return Handoff::default();
    };
    let targets = maps
        .set_link(c, u)
        .and_then(|_| maps.set_link(u, c))
        .and_then(|_| maps.add_target(u, upstream))
        .and_then(|_| maps.add_target(c, client));
    if let Err(e) = targets {
        log::debug!("handoff to the kernel refused, relaying in userspace: {e:#}");
        maps.remove_target(u);
        maps.remove_target(c);
        maps.remove_link(c);
        maps.remove_link(u);
        return Handoff::default();
    }
    // Baselines before any redirect can add to the send queues.
    let (Ok((_, client_base)), Ok((_, upstream_base))) = (
        sockopt::bytes_queued_total(client.as_raw_fd()),
        sockopt::bytes_queued_total(upstream.as_raw_fd()),
    ) else {
        return Handoff::default();
    };
    let mut handoff =
        Handoff { cookies: Some((c, u)), client_base, upstream_base, ..Handoff::default() };
    for (cookie, sock, spliced) in
        [(c, client, &mut handoff.client_spliced), (u, upstream, &mut handoff.upstream_spliced)]
    {
        match maps.add_spliced(cookie, sock) {
            Ok(()) => {
                *spliced = true;
                // Kick data-ready so bytes already queued reach the verdict.
                if let Err(e) = sockopt::set_rcvlowat(sock.as_raw_fd(), 1) {
                    log::warn!("SO_RCVLOWAT after handoff failed: {e}");
                }
            }
            Err(e) => log::debug!("socket {cookie} stays in userspace: {e:#}"),
        }
    }
    handoff
}

/// Forgets the connection's links once both sockets are closed (closing
/// removes a socket from the sockhashes by itself). Returns the final
/// (client, upstream) links for the byte counts.
pub fn forget(maps: &Maps, (c, u): (u64, u64)) -> (Link, Link) {
    let links = (maps.link(c).unwrap_or_default(), maps.link(u).unwrap_or_default());
    maps.remove_link(c);
    maps.remove_link(u);
    links
}

/// How far the kernel may run ahead of the peer: once this many redirected
/// bytes are not yet in the peer's send queue, the source is paused. The
/// kernel gives redirects no backpressure of its own (the skb is uncharged
/// from the source socket when the verdict takes it), so without this a
/// slow reader would let the psock queue grow without bound.
pub const WINDOW: u64 = 4 << 20;

/// Waits for the kernel-carried direction `src -> dst` to end, pausing it
/// whenever `dst` falls WINDOW behind. On FIN, waits until every byte before
/// it sits in `dst`'s send queue, then half-closes `dst`. `src_user_bytes`
/// is what userspace read from `src` before the handoff; `dst_base` is
/// `dst`'s send-queue total at the handoff; `user` counts bytes this
/// direction had to relay in userspace after all (see `finish_in_userspace`).
pub async fn kernel_direction(
    maps: &Maps,
    src: (&impl AsFd, &Watch),
    dst: &impl AsFd,
    src_cookie: u64,
    src_user_bytes: u64,
    dst_base: u64,
    user: &AtomicU64,
) -> End {
    let signal = maps.on_limit(src_cookie);
    if let Err(e) = maps.set_limit(src_cookie, WINDOW) {
        log::warn!("socket {src_cookie}: no flow control: {e:#}");
    }
    loop {
        match sockopt::closed_or_failed(src.0.as_fd().as_raw_fd()) {
            Err(_) => return End::SrcReset,
            Ok((false, false)) => {}
            Ok(_) => break,
        }
        tokio::select! {
            _ = src.1.changed() => {}
            _ = signal.wait() => {
                if let Some(end) = keep_up(maps, src.0, dst, src_cookie, dst_base, user).await {
                    return end;
                }
            }
        }
    }
    // A reset sets the socket error; a FIN does not.
    if let Ok(Some(e)) | Err(e) = socket2::SockRef::from(src.0).take_error() {
        log::debug!("socket {src_cookie}: error after read-closed: {e}");
        return End::SrcReset;
    }
    if let Err(end) = caught_up(maps, src.0, dst, src_cookie, src_user_bytes, dst_base).await {
        return end;
    }
    match socket2::SockRef::from(dst).shutdown(Shutdown::Write) {
        Ok(()) => End::Fin,
        Err(_) => End::DstFailed,
    }
}

/// (redirected by the kernel, taken by `dst`'s send queue) since the handoff.
fn progress(maps: &Maps, dst: &impl AsFd, src_cookie: u64, dst_base: u64) -> Option<(u64, u64)> {
    let (state, total) = sockopt::bytes_queued_total(dst.as_fd().as_raw_fd()).ok()?;
    if state != sockopt::TCP_ESTABLISHED && state != sockopt::TCP_CLOSE_WAIT {
        return None;
    }
    Some((maps.link(src_cookie)?.redirected, total.saturating_sub(dst_base)))
}

/// Called when the kernel has redirected another WINDOW. If `dst` keeps up,
/// sets the next mark; if not, pauses `src` until `dst` has caught up half
/// way. Returns the direction's end if it had to finish during the pause.
async fn keep_up(
    maps: &Maps,
    src: &impl AsFd,
    dst: &impl AsFd,
    cookie: u64,
    dst_base: u64,
    user: &AtomicU64,
) -> Option<End> {
    let Some((redirected, taken)) = progress(maps, dst, cookie, dst_base) else { return Some(End::DstFailed) };
    if redirected - taken.min(redirected) < WINDOW {
        let _ = maps.set_limit(cookie, taken + WINDOW);
        return None;
    }
    if maps.remove_spliced(cookie).is_err() {
        return None;
    }
    log::debug!("socket {cookie}: paused, peer is {} bytes behind", redirected - taken);
    let mut delay = Duration::from_millis(1);
    let taken = loop {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(20));
        let Some((redirected, taken)) = progress(maps, dst, cookie, dst_base) else { return Some(End::DstFailed) };
        if redirected - taken.min(redirected) <= WINDOW / 2 {
            break taken;
        }
    };
    match maps.add_spliced(cookie, &src.as_fd().as_raw_fd()) {
        Ok(()) => {
            let _ = maps.set_limit(cookie, taken + WINDOW);
            // Bytes that queued up while paused wait for data-ready.
            let _ = sockopt::set_rcvlowat(src.as_fd().as_raw_fd(), 1);
            log::debug!("socket {cookie}: resumed");
            None
        }
        // FIN or RST arrived while paused: only ESTABLISHED sockets can join.
        Err(_) => Some(finish_in_userspace(maps, src, dst, cookie, dst_base, user).await),
    }
}

/// Relays what is left of `src` in userspace, once every byte the kernel
/// redirected is in `dst`'s send queue (so none can be overtaken).
async fn finish_in_userspace(
    maps: &Maps,
    src: &impl AsFd,
    dst: &impl AsFd,
    cookie: u64,
    dst_base: u64,
    user: &AtomicU64,
) -> End {
    log::debug!("socket {cookie}: closed while paused, finishing in userspace");
    loop {
        match progress(maps, dst, cookie, dst_base) {
            None => return End::DstFailed,
            Some((redirected, taken)) if taken >= redirected => break,
            Some(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
    let (mut src, mut dst) = (socket2::SockRef::from(src), socket2::SockRef::from(dst));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match (&*src).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            Err(_) => return End::SrcReset,
        };
        let mut data = &buf[..n];
        while !data.is_empty() {
            match (&*dst).write(data) {
                Ok(k) => data = &data[k..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => tokio::time::sleep(Duration::from_millis(1)).await,
                Err(_) => return End::DstFailed,
            }
        }
        user.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = (&mut src, &mut dst);
    match dst.shutdown(Shutdown::Write) {
        Ok(()) => End::Fin,
        Err(_) => End::DstFailed,
    }
}

/// After a spliced socket's FIN has been passed on, resolves only if the
/// socket is then reset, so the reset still reaches the other side.
pub async fn wait_reset(sock: &impl AsFd, watch: &Watch) -> End {
    loop {
        let failed = sockopt::closed_or_failed(sock.as_fd().as_raw_fd()).map_or(true, |(_, f)| f);
        if failed && !matches!(socket2::SockRef::from(sock).take_error(), Ok(None)) {
            return End::SrcReset;
        }
        watch.changed().await;
    }
}

/// How long the counters may stand still before we stop waiting for them.
const STALL_LIMIT: Duration = Duration::from_secs(300);

/// Polls until (1) every byte `src` received went through the verdict
/// program and (2) `dst`'s send queue has taken every byte redirected to it.
async fn caught_up(
    maps: &Maps,
    src: &impl AsFd,
    dst: &impl AsFd,
    src_cookie: u64,
    src_user_bytes: u64,
    dst_base: u64,
) -> Result<(), End> {
    let mut delay = Duration::from_millis(1);
    let mut last = (u64::MAX, u64::MAX);
    let mut last_change = Instant::now();
    loop {
        let link = maps.link(src_cookie).unwrap_or_default();
        // bytes_received counts the FIN's sequence number too.
        let received = sockopt::tcp_info(src.as_fd().as_raw_fd()).map_or(0, |i| i.bytes_received.saturating_sub(1));
        let Ok((dst_state, dst_total)) = sockopt::bytes_queued_total(dst.as_fd().as_raw_fd()) else {
            return Err(End::DstFailed);
        };
        let consumed = received <= src_user_bytes + link.seen;
        let delivered = dst_total >= dst_base + link.redirected;
        if consumed && delivered {
            log::debug!(
                "socket {src_cookie} drained: received {received}, verdict saw {}, redirected {}, peer queue {dst_total} (base {dst_base})",
                link.seen,
                link.redirected
            );
            if link.dropped > 0 {
                log::error!("kernel dropped {} bytes on socket {src_cookie}", link.dropped);
            }
            return Ok(());
        }
        if dst_state != sockopt::TCP_ESTABLISHED && dst_state != sockopt::TCP_CLOSE_WAIT {
            return Err(End::DstFailed);
        }
        if (link.seen, dst_total) != last {
            last = (link.seen, dst_total);
            last_change = Instant::now();
        } else if last_change.elapsed() > STALL_LIMIT {
            log::warn!(
                "socket {src_cookie}: no progress for {STALL_LIMIT:?} while draining before FIN \
                 (received {received}, verdict saw {}, peer queue {dst_total}, expected {}); closing",
                link.seen,
                dst_base + link.redirected
            );
            return Err(End::DstFailed);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(50));
    }
}

