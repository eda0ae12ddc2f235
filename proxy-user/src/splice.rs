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
    net::Shutdown,
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use tokio::{io::Interest, net::TcpStream};

use proxy_common::Link;

use crate::{
    ebpf_maps::Maps,
    relay::End,
    sockopt,
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

/// Waits for the kernel-carried direction `src -> dst` to end. On FIN, waits
/// until every byte before it sits in `dst`'s send queue, then half-closes
/// `dst`. `src_user_bytes` is what userspace read from `src` before the
/// handoff; `dst_base` is `dst`'s send-queue total at the handoff.
pub async fn kernel_direction(
    maps: &Maps,
    src: &TcpStream,
    dst: &TcpStream,
    src_cookie: u64,
    src_user_bytes: u64,
    dst_base: u64,
) -> End {
    let end = wait_read_closed(src).await;
    if end != End::Fin {
        return end;
    }
    if let Err(end) = caught_up(maps, src, dst, src_cookie, src_user_bytes, dst_base).await {
        return end;
    }
    match socket2::SockRef::from(dst).shutdown(Shutdown::Write) {
        Ok(()) => End::Fin,
        Err(_) => End::DstFailed,
    }
}

/// Resolves when `src` has received a FIN (Fin) or was reset (SrcReset).
/// Readiness without read-closed is a stray wake-up: clear it and wait on.
async fn wait_read_closed(src: &TcpStream) -> End {
    loop {
        match src.ready(Interest::READABLE | Interest::ERROR).await {
            Ok(r) if r.is_read_closed() || r.is_error() => break,
            Ok(_) => {
                let _ = src.try_io(Interest::READABLE, || Err::<(), _>(std::io::ErrorKind::WouldBlock.into()));
            }
            Err(_) => return End::SrcReset,
        }
    }
    // A reset sets the socket error; a FIN does not. (The state after a FIN
    // varies: CLOSE_WAIT, or CLOSE once our own FIN went out first.)
    match src.take_error() {
        Ok(None) => End::Fin,
        Ok(Some(e)) | Err(e) => {
            log::debug!("socket error after read-closed: {e}");
            End::SrcReset
        }
    }
}

/// How long the counters may stand still before we stop waiting for them.
const STALL_LIMIT: Duration = Duration::from_secs(300);

/// Polls until (1) every byte `src` received went through the verdict
/// program and (2) `dst`'s send queue has taken every byte redirected to it.
async fn caught_up(
    maps: &Maps,
    src: &TcpStream,
    dst: &TcpStream,
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
        let received = sockopt::tcp_info(src.as_raw_fd()).map_or(0, |i| i.bytes_received.saturating_sub(1));
        let Ok((dst_state, dst_total)) = sockopt::bytes_queued_total(dst.as_raw_fd()) else {
            return Err(End::DstFailed);
        };
        let consumed = received <= src_user_bytes + link.seen;
        let delivered = dst_total >= dst_base + link.redirected;
        if consumed && delivered {
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

