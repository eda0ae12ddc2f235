//! Types shared by the eBPF programs (`proxy-ebpf`) and userspace (`splicer`).
#![no_std]

/// Value of the `LINKS` map, keyed by a socket's cookie (SO_COOKIE).
///
/// Userspace writes `peer` and `token` before the socket is handed to the
/// verdict program. The program adds to the counters with plain (volatile)
/// read-modify-writes: a socket's verdict runs under that socket's lock, so
/// each counter has one writer. Userspace reads them to know when the
/// kernel has caught up (half-close), for metrics and for the close line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Link {
    /// Cookie of the socket that this socket's ingress is redirected to.
    pub peer: u64,
    /// Bytes the verdict program saw arrive on this socket.
    pub seen: u64,
    /// Bytes successfully redirected to `peer`'s egress.
    pub redirected: u64,
    /// Bytes dropped because the redirect failed or an skb could not be
    /// forwarded exactly once (should stay 0; userspace resets the
    /// connection when it is not).
    pub dropped: u64,
    /// The last `LIMITS` value the program signalled on EVENTS, so each
    /// limit is signalled once (and again on the next packet if EVENTS was
    /// full).
    pub signalled: u64,
    /// Userspace's handle for the connection (both sockets carry the same
    /// one), which the program reports on EVENTS: it wakes the connection
    /// without a lookup by cookie.
    pub token: u64,
    /// Bytes TCP had already delivered that it handed to the verdict again
    /// (an overlapping retransmission, or the front of an skb userspace
    /// read in part before the handoff); cut off before the redirect.
    pub repeated: u64,
}

#[cfg(feature = "user")]
#[allow(unsafe_code)] // aya::Pod is an unsafe marker trait: it vouches for the layout.
// SAFETY: Link is repr(C), Copy, and made only of u64s, so any bit pattern is valid and there is no padding.
unsafe impl aya::Pod for Link {}

/// Map names, shared so that userspace and kernel cannot drift apart.
pub const MAP_LINKS: &str = "LINKS";
pub const MAP_TARGETS: &str = "TARGETS";
pub const MAP_SPLICED: &str = "SPLICED";
pub const MAP_LIMITS: &str = "LIMITS";
pub const MAP_EVENTS: &str = "EVENTS";
pub const PROG_VERDICT: &str = "splice_verdict";
/// Default capacity (sockets) of the maps; two sockets per connection.
pub const MAX_SOCKETS: u32 = 131_072;
