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
//! - Redirects get no backpressure from the kernel; a lagging peer gets it
//!   from a clamped TCP window on the source (see WINDOW).
use std::{
    os::fd::{AsRawFd, BorrowedFd},
    time::{Duration, Instant},
};

use tokio::net::TcpStream;

use proxy_common::Link;

use super::{maps::Maps, sockopt};
use crate::{datapath::carried::End, net};

/// What the kernel now holds of a connection.
#[derive(Default)]
pub struct Handoff {
    /// Cookies (client, upstream): both are in LINKS, LIMITS and TARGETS.
    pub cookies: (u64, u64),
    /// Whether the kernel carries client->upstream, and upstream->client.
    pub client_spliced: bool,
    pub upstream_spliced: bool,
    /// Each socket's send-queue total (see `sockopt::bytes_queued_total`)
    /// just before anything was redirected to it.
    pub client_base: u64,
    pub upstream_base: u64,
}

/// Puts both sockets in the maps, with `token` (see park.rs) as the
/// connection's handle for flow-control signals. Err when the kernel
/// cannot take the connection (a map is full, a socket is gone): then
/// nothing of it is left in the maps, and the userspace relay, which is
/// always correct, carries it. A socket that cannot join SPLICED (it
/// half-closed already) stays with the relay alone, per direction.
pub fn handoff(maps: &Maps, client: &TcpStream, upstream: &TcpStream, token: u64) -> anyhow::Result<Handoff> {
    let c = sockopt::cookie(client.as_raw_fd())?;
    let u = sockopt::cookie(upstream.as_raw_fd())?;
    let entered = (|| {
        maps.set_link(c, u, token)?;
        maps.set_link(u, c, token)?;
        // Flow control before anything can be redirected: a socket without
        // its limit would let a slow reader's queue grow without bound.
        maps.set_limit(c, WINDOW)?;
        maps.set_limit(u, WINDOW)?;
        maps.add_target(u, upstream)?;
        maps.add_target(c, client)?;
        // Baselines before any redirect can add to the send queues.
        let (_, client_base) = sockopt::bytes_queued_total(client.as_raw_fd())?;
        let (_, upstream_base) = sockopt::bytes_queued_total(upstream.as_raw_fd())?;
        anyhow::Ok((client_base, upstream_base))
    })();
    let (client_base, upstream_base) = match entered {
        Ok(bases) => bases,
        Err(e) => {
            for cookie in [c, u] {
                maps.remove_target(cookie);
                maps.remove_link(cookie);
                maps.remove_limit(cookie);
            }
            return Err(e);
        }
    };
    for sock in [client, upstream] {
        if let Err(e) = sockopt::force_sndbuf(sock.as_raw_fd(), SNDBUF) {
            log::debug!("SO_SNDBUFFORCE: {e}");
        }
    }
    let mut handoff = Handoff {
        cookies: (c, u),
        client_base,
        upstream_base,
        ..Handoff::default()
    };
    for (cookie, sock, spliced) in [
        (c, client, &mut handoff.client_spliced),
        (u, upstream, &mut handoff.upstream_spliced),
    ] {
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
    Ok(handoff)
}

/// Forgets the connection's links and limits once both sockets are closed
/// (closing removes a socket from the sockhashes by itself). Returns the
/// final (client, upstream) links for the byte counts.
pub fn forget(maps: &Maps, (c, u): (u64, u64)) -> (Link, Link) {
    let links = (
        maps.link(c).unwrap_or_default(),
        maps.link(u).unwrap_or_default(),
    );
    for cookie in [c, u] {
        maps.remove_link(cookie);
        maps.remove_limit(cookie);
    }
    if links.0.repeated + links.1.repeated > 0 {
        log::info!(
            "sockets {c}/{u}: TCP handed the kernel path {}/{} bytes a second time \
             (overlapping retransmissions); cut off, forwarded once",
            links.0.repeated,
            links.1.repeated
        );
    }
    links
}

/// How far the kernel may run ahead of the peer. The kernel gives redirects
/// no backpressure of its own: the verdict takes each skb off the source
/// socket's books, so its receive window never closes and a slow reader
/// would let the peer's psock queue grow without bound. Once this many
/// redirected bytes are not yet in the peer's send queue, the source's TCP
/// receive window is clamped shut (TCP_WINDOW_CLAMP) until the peer has
/// caught up half way. That touches neither the sockmap nor the data path,
/// so it cannot lose or reorder a byte.
pub const WINDOW: u64 = 16 << 20;

/// Each socket's send buffer once spliced (the kernel doubles it for its
/// bookkeeping). The kernel moves redirected skbs into the peer's send
/// queue from a worker that, when the queue is full, retries only a jiffy
/// later (4 ms at HZ=250): with the autotuned 4 MiB a fast stream kept
/// hitting that wait. A limit, not an allocation: an idle connection
/// costs no more for it.
const SNDBUF: i32 = 16 << 20;

/// One kernel-carried direction `src -> dst`. It keeps no state of its
/// own between calls, so a parked connection can rebuild it on each wake.
pub struct Flow<'a> {
    maps: &'a Maps,
    src: BorrowedFd<'a>,
    dst: BorrowedFd<'a>,
    cookie: u64,
    /// What userspace read from `src` before the handoff.
    src_user_bytes: u64,
    /// `dst`'s send-queue total at the handoff.
    dst_base: u64,
}

impl<'a> Flow<'a> {
    /// `cookie` is `src`'s; `dst_base` is `dst`'s send-queue total at the
    /// handoff.
    pub fn new(
        maps: &'a Maps,
        src: BorrowedFd<'a>,
        dst: BorrowedFd<'a>,
        cookie: u64,
        dst_base: u64,
    ) -> Self {
        Flow {
            maps,
            src,
            dst,
            cookie,
            src_user_bytes: 0,
            dst_base,
        }
    }

    pub fn src(&self) -> BorrowedFd<'a> {
        self.src
    }

    /// Bytes userspace read from `src` before the handoff (a PROXY header).
    pub fn consumed(self, bytes: u64) -> Self {
        Flow {
            src_user_bytes: bytes,
            ..self
        }
    }

    /// Does what `src`'s state calls for now, after any wake-up: while it is
    /// open, keeps the flow control current (None); on FIN, waits until
    /// every byte before it sits in `dst`'s send queue, half-closes `dst`
    /// and returns Fin; on a reset, SrcReset.
    pub async fn advance(&self) -> Option<End> {
        if self.maps.link(self.cookie).is_some_and(|l| l.dropped > 0) {
            // The verdict program could not forward an skb exactly once
            // (see `trim_head` in proxy-ebpf) and woke us: the stream has a
            // hole, so it must not go on.
            log::error!(
                "socket {}: the kernel dropped bytes it could not forward exactly once; resetting",
                self.cookie
            );
            return Some(End::SrcReset);
        }
        match sockopt::closed_or_failed(self.src.as_raw_fd()) {
            Err(_) => return Some(End::SrcReset),
            Ok((false, false)) => return self.keep_up().await.err(),
            Ok(_) => {}
        }
        // A reset sets the socket error; a FIN does not.
        if let Ok(Some(e)) | Err(e) = socket2::SockRef::from(&self.src).take_error() {
            log::debug!("socket {}: error after read-closed: {e}", self.cookie);
            return Some(End::SrcReset);
        }
        if let Err(end) = self.caught_up().await {
            return Some(end);
        }
        Some(match net::half_close(&self.dst) {
            Ok(()) => End::Fin,
            Err(_) => End::DstFailed,
        })
    }

    fn set_limit(&self, limit: u64) {
        if let Err(e) = self.maps.set_limit(self.cookie, limit) {
            log::warn!("socket {}: no flow control: {e:#}", self.cookie);
        }
    }

    /// (bytes redirected towards `dst`, bytes `dst`'s send queue has taken)
    /// since the handoff, or None if `dst` can no longer send.
    fn progress(&self) -> Option<(u64, u64)> {
        let (state, total) = sockopt::bytes_queued_total(self.dst.as_raw_fd()).ok()?;
        if state != sockopt::TCP_ESTABLISHED && state != sockopt::TCP_CLOSE_WAIT {
            return None;
        }
        Some((
            self.maps.link(self.cookie)?.redirected,
            total.saturating_sub(self.dst_base),
        ))
    }

    /// If `dst` keeps up, moves the limit (where the kernel signals next)
    /// to WINDOW past what `dst` has taken; if it lags WINDOW behind, holds
    /// the sender back until `dst` has caught up half way: gently first
    /// (see `slow_down`), and with a zero window if the lag still grows to
    /// one and a half WINDOWs. Safe to call at any time: a wake-up for
    /// another reason only moves the limit.
    async fn keep_up(&self) -> Result<(), End> {
        let (sent, taken) = self.progress().ok_or(End::DstFailed)?;
        if sent - taken.min(sent) < WINDOW {
            self.set_limit(taken + WINDOW);
            return Ok(());
        }
        let fd = self.src.as_raw_fd();
        let open = sockopt::window_clamp(fd).unwrap_or(0).max(1 << 20);
        log::debug!(
            "socket {}: peer {} bytes behind, holding the sender",
            self.cookie,
            sent - taken
        );
        slow_down(fd);
        let mut stopped = false;
        let mut delay = Duration::from_millis(1);
        let result = loop {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(10));
            match self.progress() {
                None => break Err(End::DstFailed),
                Some((sent, taken)) if sent - taken.min(sent) <= WINDOW / 2 => break Ok(taken),
                // FIN or RST: nothing more will come; `advance` handles it next.
                _ if sockopt::closed_or_failed(fd).map_or(true, |(c, f)| c || f) => break Ok(0),
                Some((sent, taken)) if !stopped && sent - taken.min(sent) > WINDOW + WINDOW / 2 => {
                    log::debug!("socket {}: peer still falling behind, stopping the sender", self.cookie);
                    // The kernel's minimum clamp: a zero window once in-flight bytes land.
                    let _ = sockopt::set_window_clamp(fd, 1);
                    stopped = true;
                }
                Some(_) => {}
            }
        };
        release(fd, open);
        let taken = result?;
        self.set_limit(taken + WINDOW);
        Ok(())
    }

    /// Polls until (1) every byte `src` received went through the verdict
    /// program and (2) `dst`'s send queue has taken every byte redirected.
    async fn caught_up(&self) -> Result<(), End> {
        let mut delay = Duration::from_millis(1);
        let mut last = (u64::MAX, u64::MAX);
        let mut last_change = Instant::now();
        loop {
            let seen = self.maps.link(self.cookie).map_or(0, |l| l.seen);
            // bytes_received counts the FIN's sequence number too.
            let received = sockopt::tcp_info(self.src.as_raw_fd())
                .map_or(0, |i| i.bytes_received.saturating_sub(1));
            let (sent, taken) = self.progress().ok_or(End::DstFailed)?;
            if received <= self.src_user_bytes + seen && taken >= sent {
                return Ok(());
            }
            if (seen, taken) != last {
                last = (seen, taken);
                last_change = Instant::now();
            } else if last_change.elapsed() > STALL_LIMIT {
                log::warn!(
                    "socket {}: no progress for {STALL_LIMIT:?} while draining before FIN \
                     (received {received}, verdict saw {seen}, redirected {sent}, peer took {taken}); closing",
                    self.cookie
                );
                return Err(End::DstFailed);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }
}

/// Slows the sender down without a zero window: the window is clamped to
/// one and a half of its segments, and ACKs are delayed. A zero window (or
/// one smaller than a segment, which a sender treats the same) would put
/// it in persist mode, and it would find out that the window opened again
/// only at its next probe, 200 ms or more later; this way the ACK that
/// reopens it goes out at once (`release`). When the peer is merely slower
/// than the sender this is enough; when it has stopped reading, the lag
/// keeps growing and `keep_up` closes the window.
fn slow_down(fd: std::os::fd::RawFd) {
    let mss = sockopt::tcp_info(fd).map_or(1460, |i| i.rcv_mss.max(536));
    let _ = sockopt::set_quickack(fd, false);
    let _ = sockopt::set_window_clamp(fd, (mss + mss / 2) as i32);
}

/// Opens the window again and sends the ACK that was being delayed, so
/// the sender learns at once.
fn release(fd: std::os::fd::RawFd, clamp: i32) {
    let _ = sockopt::set_window_clamp(fd, clamp);
    let _ = sockopt::set_quickack(fd, true);
}

/// How long the counters may stand still before we stop waiting for them.
const STALL_LIMIT: Duration = Duration::from_mins(5);

/// Whether a socket whose FIN was already passed on has since been reset
/// (so the reset still reaches the other side).
pub fn was_reset(sock: BorrowedFd<'_>) -> bool {
    let failed = sockopt::closed_or_failed(sock.as_raw_fd()).map_or(true, |(_, f)| f);
    failed && !matches!(socket2::SockRef::from(&sock).take_error(), Ok(None))
}
