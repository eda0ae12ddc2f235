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
//!   from a clamped TCP window on the source, past a per-direction window
//!   that budget.rs grants (see `Flow::keep_up`).
use std::{
    os::fd::{AsRawFd, BorrowedFd},
    time::{Duration, Instant},
};

use tokio::net::TcpStream;

use proxy_common::Link;

use super::{
    budget::{Budget, Grant},
    maps::Maps,
    sockopt,
};
use crate::{datapath::carried::End, net};

/// What the kernel now holds of a connection.
#[derive(Default)]
pub struct Handoff {
    /// Cookies (client, upstream): both are in LINKS, LIMITS and TARGETS.
    pub cookies: (u64, u64),
    /// Whether the kernel carries client->upstream, and upstream->client.
    pub client_spliced: bool,
    pub upstream_spliced: bool,
    /// Each socket's send-queue total (see `sockopt::SendQueue`)
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
        maps.set_limit(c, Grant::FLOOR.window())?;
        maps.set_limit(u, Grant::FLOOR.window())?;
        maps.add_target(u, upstream)?;
        maps.add_target(c, client)?;
        // Baselines before any redirect can add to the send queues.
        let client_base = sockopt::send_queue(client.as_raw_fd())?.total();
        let upstream_base = sockopt::send_queue(upstream.as_raw_fd())?.total();
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
        Grant::FLOOR.apply_at_handoff(sock.as_raw_fd(), sock.as_raw_fd());
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
             (overlapping retransmissions, or skbs read in part before the handoff); \
             cut off, forwarded once",
            links.0.repeated,
            links.1.repeated
        );
    }
    links
}

/// One kernel-carried direction `src -> dst`. It keeps no state of its
/// own between calls (its grant is the caller's), so a parked connection
/// can rebuild it on each wake.
pub struct Flow<'a> {
    maps: &'a Maps,
    /// Where a grant grows from; None: it stays at the floor.
    budget: Option<&'a Budget>,
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
            budget: None,
            src,
            dst,
            cookie,
            src_user_bytes: 0,
            dst_base,
        }
    }

    /// Lets the direction's grant grow from `budget`.
    pub fn growing(self, budget: &'a Budget) -> Self {
        Flow {
            budget: Some(budget),
            ..self
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
    /// open, keeps the flow control and `grant` current (None); on FIN,
    /// waits until every byte before it sits in `dst`'s send queue,
    /// half-closes `dst` and returns Fin; on a reset, SrcReset. The caller
    /// gives the grant back to the budget once the direction has ended.
    pub async fn advance(&self, grant: &mut Grant) -> Option<End> {
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
            Ok((false, false)) => return self.keep_up(grant).await.err(),
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

    /// How far the direction has come since the handoff, or None if `dst`
    /// can no longer send.
    fn progress(&self) -> Option<Progress> {
        let q = sockopt::send_queue(self.dst.as_raw_fd()).ok()?;
        if q.state != sockopt::TCP_ESTABLISHED && q.state != sockopt::TCP_CLOSE_WAIT {
            return None;
        }
        let sent = self.maps.link(self.cookie)?.redirected;
        let taken = q.total().saturating_sub(self.dst_base);
        Some(Progress {
            sent,
            taken,
            acked: taken.saturating_sub(q.queued),
            lag: sent.saturating_sub(taken),
            peer_full: q.peer_full,
        })
    }

    /// If `dst` keeps up, moves the limit (where the kernel signals next)
    /// a window past what `dst` has taken, and resizes the grant
    /// (`regrant`). If it lags a window behind, holds the sender back until
    /// `dst` has caught up half way: gently (see `slow_down`) while `dst`'s
    /// peer acknowledges bytes, growing the grant as the budget allows, and
    /// with a zero window once `dst`'s peer has acknowledged nothing since
    /// the last look and either advertises a zero window itself or the lag
    /// has reached one and a half windows. A zero
    /// window costs the sender a persist-timer probe (200 ms or more) to
    /// learn that it reopened, so a reader that still reads must not get
    /// one; a reader that stopped must get one at once, because the gentle
    /// hold barely slows a sender on a fast link. Safe to call at any time:
    /// a wake-up for another reason only moves the limit.
    async fn keep_up(&self, grant: &mut Grant) -> Result<(), End> {
        let p = self.progress().ok_or(End::DstFailed)?;
        if p.lag < grant.window() {
            self.regrant(grant, &p);
            self.set_limit(p.taken + grant.window());
            return Ok(());
        }
        let fd = self.src.as_raw_fd();
        log::debug!("socket {}: peer {} bytes behind, holding the sender", self.cookie, p.lag);
        let stop = || {
            log::debug!("socket {}: peer stopped reading, stopping the sender", self.cookie);
            // The kernel's minimum clamp: a zero window once in-flight bytes land.
            let _ = sockopt::set_window_clamp(fd, 1);
            true
        };
        slow_down(fd);
        let mut stopped = false;
        let (mut acked, mut grown_at) = (p.acked, p.acked);
        let (mut delay, mut last_lag) = (Duration::from_millis(1), p.lag);
        let result = loop {
            tokio::time::sleep(delay).await;
            let Some(p) = self.progress() else {
                break Err(End::DstFailed);
            };
            // Every millisecond while the lag grows and the sender is not
            // stopped: the gentle hold barely slows a sender on a fast link,
            // so each millisecond a stopped reader goes unnoticed costs a
            // millisecond at line rate. Otherwise less and less often (a
            // reader that is merely slow keeps its task for a while).
            delay = if !stopped && p.lag > last_lag {
                Duration::from_millis(1)
            } else {
                (delay * 2).min(Duration::from_millis(10))
            };
            last_lag = p.lag;
            let reading = p.acked > acked;
            acked = p.acked;
            // Grown for a reader that took half a window since: one that
            // only filled its receive buffer before it stopped gets nothing.
            if p.acked >= grown_at + grant.window() / 2 {
                grown_at = p.acked;
                // The send buffer only: the window stays held.
                if let Some(next) = self.budget.and_then(|b| b.grow(*grant)) {
                    log::debug!("socket {}: window {} -> {} while held", self.cookie, grant.window(), next.window());
                    *grant = next;
                    next.apply_sndbuf(self.dst.as_raw_fd());
                }
            }
            if p.lag <= grant.window() / 2 {
                break Ok(p.taken);
            }
            // FIN or RST: nothing more will come; `advance` handles it next.
            if sockopt::closed_or_failed(fd).map_or(true, |(c, f)| c || f) {
                break Ok(0);
            }
            if !stopped && !reading && (p.peer_full || p.lag > grant.window() + grant.window() / 2) {
                stopped = stop();
            }
        };
        release(fd, grant.window_clamp());
        let taken = result?;
        self.set_limit(taken + grant.window());
        Ok(())
    }

    /// The grant a step up, if the budget allows.
    fn grow(&self, grant: &mut Grant) {
        if let Some(next) = self.budget.and_then(|b| b.grow(*grant)) {
            self.resize(grant, next);
        }
    }

    fn resize(&self, grant: &mut Grant, next: Grant) {
        log::debug!("socket {}: window {} -> {}", self.cookie, grant.window(), next.window());
        *grant = next;
        next.apply(self.src.as_raw_fd(), self.dst.as_raw_fd());
    }

    /// Up a step when this wake-up is the kernel's signal that another
    /// window went through and `dst`'s peer has acknowledged all but less
    /// than a window of what `dst` took (a reader that stopped leaves its
    /// send queue full); back to the floor, if the budget lent more, when
    /// it is another wake-up (a sweep, see budget.rs) and the direction is
    /// idle: nothing ahead of `dst`'s send queue, and less than a floor
    /// window in it.
    fn regrant(&self, grant: &mut Grant, p: &Progress) {
        let Some(budget) = self.budget else {
            return;
        };
        let unacked = p.taken - p.acked;
        let signalled = self.maps.limit(self.cookie).is_some_and(|limit| p.sent >= limit);
        if signalled && unacked < grant.window() {
            self.grow(grant);
        } else if !signalled && *grant != Grant::FLOOR && p.lag == 0 && unacked < Grant::FLOOR.window() {
            budget.release(*grant);
            self.resize(grant, Grant::FLOOR);
        }
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
            let Progress { sent, taken, .. } = self.progress().ok_or(End::DstFailed)?;
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

/// Where a kernel-carried direction stands, in bytes since the handoff.
struct Progress {
    /// Redirected towards `dst` by the verdict program.
    sent: u64,
    /// Taken into `dst`'s send queue.
    taken: u64,
    /// Of those, acknowledged by `dst`'s peer.
    acked: u64,
    /// Redirected but not yet in `dst`'s send queue: waiting on its psock.
    lag: u64,
    /// `dst`'s peer advertises a zero window.
    peer_full: bool,
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
