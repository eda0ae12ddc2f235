//! sk_skb stream-verdict program: every skb that arrives on a spliced socket
//! is redirected to the egress of its peer socket, so payload bytes never
//! reach userspace.
#![no_std]
#![no_main]

use core::ptr::{addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::{bpf_get_socket_cookie, bpf_probe_read_kernel},
    macros::{map, stream_verdict},
    maps::{HashMap, PerCpuArray, RingBuf, SockHash},
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
    let (seen, redirected, dropped, signalled, repeated) = unsafe {
        (
            addr_of_mut!((*link).seen),
            addr_of_mut!((*link).redirected),
            addr_of_mut!((*link).dropped),
            addr_of_mut!((*link).signalled),
            addr_of_mut!((*link).repeated),
        )
    };
    // `token` is written only by userspace, before the socket joins SPLICED.
    let token = unsafe { (*link).token };
    // Cut off what TCP already handed on (see `already_delivered`); the
    // kernel then advances `copied_seq` by what is left, so it stays exact.
    let behind = already_delivered(&ctx);
    let len = match trim_head(&ctx, len, behind) {
        Some(left) => left,
        None => {
            // Cannot forward this skb exactly once: drop it, count it, and
            // wake userspace, which resets the connection (a stream with a
            // hole or a repeat must not reach the broker).
            set(dropped, field(dropped) + len);
            error!(&ctx, "splice: socket {}: {} of {} bytes already delivered, cannot cut; dropped", cookie, behind, len);
            let _ = EVENTS.output::<u64>(token, 0);
            return SK_DROP;
        }
    };
    if behind > 0 {
        set(repeated, field(repeated) + u64::from(behind));
        debug!(&ctx, "splice: socket {}: cut {} bytes TCP had already delivered", cookie, behind);
    }
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

/// Byte offsets inside kernel structures, which userspace reads from this
/// kernel's BTF and sets before loading (`datapath::kernel::layout`).
#[unsafe(no_mangle)]
static SKB_SEQ_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static TCP_COPIED_SEQ_OFFSET: u32 = 0;

/// One slot per CPU to turn a kernel pointer into a plain number, which
/// `bpf_probe_read_kernel` accepts (storing a pointer in a map needs
/// CAP_PERFMON, which loading sk_skb programs needs anyway).
#[map]
static ADDR: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// How many leading bytes of this skb TCP has already delivered.
///
/// The verdict is fed by `tcp_read_skb`, which hands over each queued skb
/// whole (Linux 6.x). TCP's own readers skip the bytes of an skb that lie
/// before `copied_seq`, and some skbs have them: a retransmission that
/// overlaps data already received (its sender cut the segments
/// differently, or an out-of-order segment overlaps the one that filled
/// the hole before it), or an skb that a recv() before the handoff read in
/// part. Redirected whole, those bytes would reach the peer twice.
/// So: `copied_seq` (where TCP has delivered up to) minus the skb's own
/// `seq` (TCP_SKB_CB(skb)->seq).
fn already_delivered(ctx: &SkBuffContext) -> u32 {
    // SAFETY: the reads go through bpf_probe_read_kernel, which checks the
    // address; the offsets come from this kernel's BTF.
    unsafe {
        let Some(slot) = ADDR.get_ptr_mut(0) else {
            return 0;
        };
        let seq_off = u64::from(read_volatile(&SKB_SEQ_OFFSET));
        let copied_off = u64::from(read_volatile(&TCP_COPIED_SEQ_OFFSET));
        write_volatile(slot, ctx.skb.skb as u64);
        let skb = read_volatile(slot);
        let sk = (*ctx.skb.skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return 0;
        }
        write_volatile(slot, sk as u64);
        let sk = read_volatile(slot);
        let (Ok(seq), Ok(copied)) = (
            bpf_probe_read_kernel((skb + seq_off) as *const u32),
            bpf_probe_read_kernel((sk + copied_off) as *const u32),
        ) else {
            return 0;
        };
        // Sequence numbers wrap: compare as a signed distance.
        let behind = copied.wrapping_sub(seq) as i32;
        if behind > 0 { behind as u32 } else { 0 }
    }
}

/// The most the head of an skb can be cut by: CUTS cuts of 4095 bytes, the
/// most `bpf_skb_adjust_room` takes at once for sk_skb programs, so about
/// 1 MiB. Overlaps of four 64 KiB loopback segments (262 KB) were seen
/// under load; more than the limit is treated as a hole (see the caller).
const CUTS: u32 = 256;
const MAX_CUT: u32 = CUTS * 4095;

/// Cuts `behind` bytes off the front of the skb; the length left, or None
/// if it cannot (nothing would be left, or the cut is too large or failed).
fn trim_head(ctx: &SkBuffContext, len: u64, behind: u32) -> Option<u64> {
    if behind == 0 {
        return Some(len);
    }
    if u64::from(behind) >= len || behind > MAX_CUT {
        return None;
    }
    let mut left = behind;
    for _ in 0..CUTS {
        if left == 0 {
            break;
        }
        let cut = left.min(4095);
        ctx.adjust_room(-(cut as i32), 0, 0).ok()?;
        left -= cut;
    }
    Some(len - u64::from(behind))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
