//! The process-wide cap on what spliced connections may hold in kernel
//! queues (`--max-buffered`).
//!
//! A redirected byte waits on the peer's psock queue, which no `tcp_mem`
//! accounts for (it stays charged to the source's receive buffer until it
//! moves on), and then in the peer's send queue, whose size splicer forces
//! past `net.core.wmem_max` so that a fast stream does not stall. So each
//! kernel-carried direction has a `Grant`: the size of its destination's
//! send buffer, and how far its redirects may run ahead of that send queue
//! before its source is held back (splice.rs).
//!
//! Every direction starts at the floor, which costs nothing from the
//! budget: a client that stops reading holds about `Grant::held()` of the
//! floor once splicer has stopped its writer, plus what the writer sent
//! while splicer noticed (its hold looks every millisecond); the kernel's
//! own ceiling, the source's receive buffer (`Grant::rcvbuf`), is 17 MiB at
//! the floor, so it is that reaction that bounds it. A direction whose
//! peer keeps up doubles its grant at each flow-control signal, up to the
//! ceiling, while the sum of what grants above the floor may hold stays
//! within the cap. Grants go back to the floor when their direction is
//! idle and drained (parked connections are looked at every `SWEEP`) and
//! when their connection ends.
use std::{
    os::fd::RawFd,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use super::sockopt;

/// What one kernel-carried direction may hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Grant(u8);

/// The floor's window: 256 KiB.
const FLOOR_SHIFT: u8 = 18;
/// The ceiling: 16 MiB, 2^6 floors.
const TOP: u8 = 6;

/// See `Grant::rcvbuf`.
const LAG_ROOM: i32 = 16 << 20;

/// How often parked connections with a grant above the floor are looked at.
pub const SWEEP: Duration = Duration::from_secs(1);

impl Grant {
    pub const FLOOR: Grant = Grant(0);

    /// How far redirects may run ahead of the destination's send queue
    /// before the source is slowed down.
    pub fn window(self) -> u64 {
        1 << (FLOOR_SHIFT + self.0)
    }

    /// The destination's SO_SNDBUF (the kernel doubles it for its
    /// bookkeeping, so the send queue holds up to about twice this).
    fn sndbuf(self) -> i32 {
        1 << (FLOOR_SHIFT + self.0)
    }

    /// The source's TCP_WINDOW_CLAMP: what its sender may have in flight.
    /// The verdict takes bytes off the receive queue as they come, so
    /// the kernel would otherwise grow the receive window to its maximum
    /// (tcp_rmem), and a zero window would take effect only after that
    /// much more had landed.
    pub fn window_clamp(self) -> i32 {
        1 << (FLOOR_SHIFT + self.0)
    }

    /// The source's receive buffer. Redirected skbs stay charged to it
    /// until the redirect worker has moved them into the destination's
    /// send queue, so with a buffer near the clamp a worker running behind
    /// shrinks the window below one segment (64 KiB on loopback), which a
    /// sender treats as zero: it waits for its persist probe, 200 ms or
    /// more, because nothing sends a window update when the worker catches
    /// up (seen: 0.2 GB bulk at 0.5 GB/s instead of 1.5-2). So the buffer
    /// leaves room for LAG_ROOM of such skbs besides the clamp; a lag past
    /// that is `keep_up`'s to hold (splice.rs).
    fn rcvbuf(self) -> i32 {
        4 * self.window_clamp() + LAG_ROOM
    }

    /// Sets the direction `src -> dst` to this grant. The source's receive
    /// buffer is set (and so locked) too: receive autotuning, which the
    /// verdict's instant reads drive up, raises the window clamp with the
    /// buffer, and lifted the zero window that held a sender back (seen:
    /// 330 MB redirected to a client that had stopped reading). Its size
    /// (`rcvbuf`) keeps the clamp what limits the window.
    pub fn apply(self, src: RawFd, dst: RawFd) {
        self.apply_with_rcvbuf(src, dst, self.rcvbuf());
    }

    /// `apply` at the handoff, where the source's receive buffer is never
    /// made smaller than it is. A connection relayed in userspace first
    /// (`--handoff auto`) can have megabytes queued there, and they stay
    /// charged to it until the redirect worker has passed them on; a
    /// smaller buffer would advertise a zero window, which nothing but the
    /// sender's persist probe reopens, 200 ms or more later (seen: 0.2 GB
    /// bulk at 0.2-0.6 GB/s instead of 1.5-2).
    pub fn apply_at_handoff(self, src: RawFd, dst: RawFd) {
        let now = sockopt::rcvbuf(src).unwrap_or(0);
        self.apply_with_rcvbuf(src, dst, now.max(self.rcvbuf()));
    }

    fn apply_with_rcvbuf(self, src: RawFd, dst: RawFd, rcvbuf: i32) {
        self.apply_sndbuf(dst);
        if let Err(e) = sockopt::force_rcvbuf(src, rcvbuf) {
            log::debug!("SO_RCVBUFFORCE: {e}");
        }
        if let Err(e) = sockopt::set_window_clamp(src, self.window_clamp()) {
            log::debug!("TCP_WINDOW_CLAMP: {e}");
        }
    }

    /// Only the destination's send buffer, while the source's window is
    /// held (splice.rs).
    pub fn apply_sndbuf(self, dst: RawFd) {
        if let Err(e) = sockopt::force_sndbuf(dst, self.sndbuf()) {
            log::debug!("SO_SNDBUFFORCE: {e}");
        }
    }

    /// What the direction holds in the kernel once its stopped reader's
    /// writer is stopped: the send queue (2 × sndbuf) and the redirects
    /// ahead of it, 1.5 windows plus what was in flight when the window
    /// closed (at most a window clamp): 4.5 windows, rounded up to 5. What
    /// lands while splicer notices comes on top (splice.rs `keep_up`).
    pub fn held(self) -> u64 {
        5 * self.window()
    }

    fn cost(self) -> u64 {
        self.held() - Grant::FLOOR.held()
    }

    fn up(self) -> Option<Grant> {
        (self.0 < TOP).then_some(Grant(self.0 + 1))
    }

    /// One byte each for two grants, for a parked connection's slot.
    pub fn pack(pair: [Grant; 2]) -> u8 {
        pair[0].0 | (pair[1].0 << 4)
    }

    pub fn unpack(b: u8) -> [Grant; 2] {
        [Grant(b & 0xf), Grant(b >> 4)]
    }
}

pub struct Budget {
    cap: u64,
    /// Sum of `Grant::cost` over live grants.
    granted: AtomicU64,
    /// Grants that could not grow because of the cap.
    refused: AtomicU64,
}

impl Budget {
    pub fn new(cap: u64) -> Budget {
        Budget {
            cap,
            granted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// The default cap: half the total at which the kernel puts TCP under
    /// memory pressure (the middle value of `net.ipv4.tcp_mem`, in pages),
    /// so spliced connections alone cannot push the host there. 512 MiB if
    /// that cannot be read.
    pub fn default_cap() -> u64 {
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(512 << 20, |pages| pages * page_size() / 2)
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// What the live grants above the floor may hold, together.
    pub fn granted(&self) -> u64 {
        self.granted.load(Relaxed)
    }

    /// How many times a grant could not grow because of the cap.
    pub fn refused(&self) -> u64 {
        self.refused.load(Relaxed)
    }

    /// The next grant up from `g`, if there is one and the cap allows it.
    pub fn grow(&self, g: Grant) -> Option<Grant> {
        let next = g.up()?;
        let more = next.cost() - g.cost();
        let taken = self
            .granted
            .fetch_update(Relaxed, Relaxed, |now| (now + more <= self.cap).then_some(now + more));
        match taken {
            Ok(_) => Some(next),
            Err(_) => {
                self.refused.fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// Gives `g` back: its direction is back at the floor, or gone.
    pub fn release(&self, g: Grant) {
        self.granted.fetch_sub(g.cost(), Relaxed);
    }
}

fn page_size() -> u64 {
    // The pages of tcp_mem are the kernel's: 4 KiB on x86-64 and most arm64.
    4096
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_double_from_the_floor_to_the_ceiling() {
        assert_eq!(Grant::FLOOR.window(), 256 << 10);
        let b = Budget::new(u64::MAX);
        let mut g = Grant::FLOOR;
        while let Some(next) = b.grow(g) {
            assert_eq!(next.window(), 2 * g.window());
            g = next;
        }
        assert_eq!(g.window(), 16 << 20);
        assert_eq!(b.granted(), g.held() - Grant::FLOOR.held());
        b.release(g);
        assert_eq!(b.granted(), 0);
    }

    #[test]
    fn the_cap_stops_growth_and_counts_it() {
        // Room for exactly one step up from the floor.
        let b = Budget::new(Grant(1).held() - Grant::FLOOR.held());
        let one = b.grow(Grant::FLOOR).unwrap();
        assert_eq!(b.grow(one), None);
        assert_eq!(b.grow(Grant::FLOOR), None);
        assert_eq!(b.refused(), 2);
        b.release(one);
        assert_eq!(b.grow(Grant::FLOOR), Some(one));
    }

    #[test]
    fn two_grants_pack_into_a_byte() {
        let pair = [Grant(6), Grant(3)];
        assert_eq!(Grant::unpack(Grant::pack(pair)), pair);
        assert_eq!(Grant::unpack(0), [Grant::FLOOR; 2]);
    }
}
