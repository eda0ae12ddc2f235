//! sk_skb stream-verdict program: every skb that arrives on a spliced socket
//! is redirected to the egress of its peer socket, so payload bytes never
//! reach userspace.
#![no_std]
#![no_main]

use core::ptr::{addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, RingBuf, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::{debug, error, warn};
use proxy_common::{Link, MAX_SOCKETS};

/// Socket cookie -> peer cookie and byte counters. Preallocation is off so
/// idle capacity costs no kernel memory.
#[map]
static LINKS: HashMap<u64, Link> = HashMap::with_max_entries(MAX_SOCKETS, BPF_F_NO_PREALLOC);

/// Redirect targets, keyed by cookie. No program is attached to this map:
/// being in it only makes a socket reachable by `bpf_sk_redirect_hash`.
#[map]
static TARGETS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Sockets whose ingress this program handles (the verdict program is
/// attached to this map). Kept apart from TARGETS so that userspace can make
/// both sockets of a pair reachable before either one starts redirecting.
#[map]
static SPLICED: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Socket cookie -> a `redirected` mark, written only by userspace. The
/// kernel gives redirects no backpressure of their own (the verdict takes
/// each skb off the source socket's books), so userspace asks to be told
/// each time another stretch has gone through, and checks that the peer
/// keeps up (see splice.rs).
#[map]
static LIMITS: HashMap<u64, u64> = HashMap::with_max_entries(MAX_SOCKETS, BPF_F_NO_PREALLOC);

/// Tokens (see Link) of connections one of whose sockets' `redirected`
/// reached its LIMITS mark.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

const BPF_F_NO_PREALLOC: u32 = 1;

#[stream_verdict]
pub fn splice_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: the helper only reads the socket the skb belongs to.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut _) };
    let len = u64::from(ctx.len());
    if len == 0 {
        // A bare FIN reaches the verdict as an empty skb. Redirecting it
        // would fail once userspace has half-closed the peer and report
        // EPIPE on it; the FIN itself is passed on by userspace.
        return SK_DROP;
    }
    let Some(link) = LINKS.get_ptr_mut(&cookie) else {
        // Userspace inserts the link before the socket and removes it after
        // the socket is gone, so this is a bug; keep the bytes in the socket.
        error!(&ctx, "splice: no link for socket {}", cookie);
        return SK_PASS;
    };
    // SAFETY (all derefs of `link` below): it points into a live map value.
    // Each socket's verdict runs serialised under that socket's lock, so
    // every Link field has exactly one writer and a plain (volatile,
    // 8-aligned) read-modify-write cannot lose updates.
    let field = |f: *mut u64| unsafe { read_volatile(f) };
    let set = |f: *mut u64, v: u64| unsafe { write_volatile(f, v) };
    let (seen, redirected, dropped, signalled) = unsafe {
        (
            addr_of_mut!((*link).seen),
            addr_of_mut!((*link).redirected),
            addr_of_mut!((*link).dropped),
            addr_of_mut!((*link).signalled),
        )
    };
    set(seen, field(seen) + len);
    let peer = unsafe { (*link).peer };
    if TARGETS.redirect_skb(&ctx, peer, 0) as u32 != SK_PASS {
        set(dropped, field(dropped) + len);
        error!(&ctx, "splice: redirect {} -> {} failed, {} bytes dropped", cookie, peer, len);
        return SK_DROP;
    }
    set(redirected, field(redirected) + len);
    debug!(&ctx, "splice: {} bytes {} -> {}", len, cookie, peer);
    // SAFETY: LIMITS values are plain u64s, copied out at once.
    if let Some(limit) = unsafe { LIMITS.get(&cookie).copied() } {
        if field(redirected) >= limit && field(signalled) != limit {
            // SAFETY: as above; `token` is written only by userspace, before
            // the socket joins SPLICED.
            let token = unsafe { (*link).token };
            // Marked as signalled only once the signal is in: with EVENTS
            // full, the socket's next packet tries again, so userspace
            // hears of every limit (its flow control depends on it).
            if EVENTS.output::<u64>(token, 0).is_ok() {
                set(signalled, limit);
            } else {
                warn!(&ctx, "splice: EVENTS full, socket {} signalled again on its next packet", cookie);
            }
        }
    }
    SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
