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
use aya_log_ebpf::{debug, error};
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

/// Socket cookie -> redirected-bytes mark. Written only by userspace: when a
/// socket's `redirected` reaches its limit, the program puts the cookie on
/// EVENTS so userspace can check that the peer keeps up (the kernel gives
/// redirects no backpressure of their own).
#[map]
static LIMITS: HashMap<u64, u64> = HashMap::with_max_entries(MAX_SOCKETS, BPF_F_NO_PREALLOC);

/// Cookies of sockets that reached their limit.
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
    // SAFETY: `link` points into a live map value. Each socket's verdict runs
    // serialised under that socket's lock, so every counter has exactly one
    // writer and a plain (volatile, 8-aligned) add cannot lose updates.
    let add = |field: *mut u64, n: u64| unsafe { write_volatile(field, read_volatile(field) + n) };
    let peer = unsafe { (*link).peer };
    add(unsafe { addr_of_mut!((*link).seen) }, len);
    let verdict = TARGETS.redirect_skb(&ctx, peer, 0) as u32;
    if verdict == SK_PASS {
        add(unsafe { addr_of_mut!((*link).redirected) }, len);
        debug!(&ctx, "splice: {} bytes {} -> {}", len, cookie, peer);
        // SAFETY: as above; LIMITS values are plain u64s.
        unsafe {
            if let Some(&limit) = LIMITS.get(&cookie) {
                let signalled = addr_of_mut!((*link).signalled);
                if read_volatile(addr_of_mut!((*link).redirected)) >= limit && read_volatile(signalled) != limit {
                    write_volatile(signalled, limit);
                    if EVENTS.output::<u64>(cookie, 0).is_err() {
                        error!(&ctx, "splice: EVENTS full, socket {} not signalled", cookie);
                    }
                }
            }
        }
    } else {
        add(unsafe { addr_of_mut!((*link).dropped) }, len);
        error!(&ctx, "splice: redirect {} -> {} failed, {} bytes dropped", cookie, peer, len);
    }
    if verdict == SK_PASS { SK_PASS } else { SK_DROP }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
