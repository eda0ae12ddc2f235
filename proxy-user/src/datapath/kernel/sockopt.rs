//! The few socket options and ioctls that std, tokio and socket2 do not
//! expose: SO_COOKIE, TCP_INFO, the window clamp, SIOCOUTQ and friends.
// Raw getsockopt/setsockopt/ioctl/poll on fds the caller owns; each call
// says what it reads or writes. (The other unsafe modules: epoll.rs,
// maps.rs, and the libc calls in app/mod.rs.)
#![allow(unsafe_code)]
use std::{io, mem, os::fd::RawFd};

/// Kernel TCP states (include/net/tcp_states.h) that matter here.
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_CLOSE_WAIT: u8 = 8;

/// getsockopt for a plain-old-data value; returns it and the length the
/// kernel wrote.
fn get<T: Default>(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<(T, usize)> {
    let mut value = T::default();
    let mut len = mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is a writable T of `len` bytes that outlives the call;
    // callers only use integer and repr(C) integer-struct types.
    let rc = unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &raw mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((value, len as usize))
}

fn set(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    let len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: passes a readable int of the stated size.
    let rc = unsafe { libc::setsockopt(fd, level, name, (&raw const value).cast(), len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The leading part of the kernel's `struct tcp_info`, up to the fields we
/// read. The kernel copies min(optlen, its size), so a prefix is fine.
#[repr(C)]
#[derive(Default)]
struct TcpInfoPrefix {
    state: u8,
    _u8s: [u8; 7],
    _rto_ato_snd_mss: [u32; 3],
    rcv_mss: u32,
    _u32s: [u32; 20],
    _pacing_rate: u64,
    _max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
    _segs_to_data_segs_out: [u32; 6],
    _delivery_rate_to_sndbuf_limited: [u64; 4],
    _delivered: [u32; 2],
    _bytes_sent_retrans: [u64; 2],
    _dsack_to_rcv_ooopack: [u32; 3],
    snd_wnd: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpInfo {
    pub state: u8,
    /// Bytes of ours the peer has acknowledged (the SYN and FIN count one each).
    pub bytes_acked: u64,
    /// Bytes received in sequence from the peer (a FIN counts one).
    pub bytes_received: u64,
    /// The kernel's estimate of the peer's segment size.
    pub rcv_mss: u32,
    /// The window the peer advertises (Linux 5.19+; None before).
    pub snd_wnd: Option<u32>,
}

pub fn tcp_info(fd: RawFd) -> io::Result<TcpInfo> {
    let (info, len) = get::<TcpInfoPrefix>(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    if len < mem::offset_of!(TcpInfoPrefix, _segs_to_data_segs_out) {
        return Err(io::Error::other(
            "kernel tcp_info too short (needs Linux 4.1+)",
        ));
    }
    Ok(TcpInfo {
        state: info.state,
        bytes_acked: info.bytes_acked,
        bytes_received: info.bytes_received,
        rcv_mss: info.rcv_mss,
        snd_wnd: (len >= mem::size_of::<TcpInfoPrefix>()).then_some(info.snd_wnd),
    })
}

/// The socket's cookie: a stable 64-bit id the eBPF program can also read.
pub fn cookie(fd: RawFd) -> io::Result<u64> {
    get::<u64>(fd, libc::SOL_SOCKET, libc::SO_COOKIE).map(|(c, _)| c)
}

/// Bytes in the send queue not yet acknowledged by the peer (SIOCOUTQ).
pub fn unacked_send_queue(fd: RawFd) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as u64)
}

/// A socket's send side: its TCP state, the bytes the peer has
/// acknowledged since it opened, and the bytes still queued.
#[derive(Debug, Clone, Copy)]
pub struct SendQueue {
    pub state: u8,
    pub acked: u64,
    pub queued: u64,
    /// The peer's receive window is shut (it has stopped reading, or reads
    /// slower than we send).
    pub peer_full: bool,
}

impl SendQueue {
    /// Total bytes that have entered the send queue since the socket
    /// opened. Only differences are meaningful.
    pub fn total(self) -> u64 {
        self.acked + self.queued
    }
}

/// The two reads are not atomic; reading the acknowledged count first can
/// only under-count the total, never over-count it.
pub fn send_queue(fd: RawFd) -> io::Result<SendQueue> {
    let info = tcp_info(fd)?;
    let queued = unacked_send_queue(fd)?;
    Ok(SendQueue {
        state: info.state,
        acked: info.bytes_acked,
        queued,
        peer_full: info.snd_wnd == Some(0),
    })
}

/// Sets SO_RCVLOWAT. On TCP this also re-checks the receive queue and calls
/// the socket's data-ready callback if bytes are waiting, which is how bytes
/// that arrived before the socket joined the sockmap reach the verdict program.
pub fn set_rcvlowat(fd: RawFd, bytes: i32) -> io::Result<()> {
    set(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes)
}

/// Caps the receive window this socket advertises (the kernel's minimum
/// is about 1 KiB, below which it advertises a zero window).
pub fn set_window_clamp(fd: RawFd, bytes: i32) -> io::Result<()> {
    set(fd, libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP, bytes)
}

/// SO_SNDBUFFORCE (needs CAP_NET_ADMIN, which the offload needs anyway):
/// unlike SO_SNDBUF it is not capped by net.core.wmem_max.
pub fn force_sndbuf(fd: RawFd, bytes: i32) -> io::Result<()> {
    set(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, bytes)
}

/// SO_RCVBUFFORCE: like SO_RCVBUF, it locks the receive buffer, so the
/// kernel's autotuning no longer grows it, nor the window clamp with it.
pub fn force_rcvbuf(fd: RawFd, bytes: i32) -> io::Result<()> {
    set(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes)
}

/// The receive buffer as `force_rcvbuf` would set it: SO_RCVBUF reads back
/// twice the value set (the kernel's bookkeeping share), so this halves it.
pub fn rcvbuf(fd: RawFd) -> io::Result<i32> {
    get::<libc::c_int>(fd, libc::SOL_SOCKET, libc::SO_RCVBUF).map(|(b, _)| b / 2)
}

/// TCP_QUICKACK. Off: ACKs are delayed (the peer's next segment waits for
/// the delayed-ACK timer when its window is full). On: an ACK that was
/// being delayed goes out now, carrying the current window.
pub fn set_quickack(fd: RawFd, on: bool) -> io::Result<()> {
    set(fd, libc::IPPROTO_TCP, libc::TCP_QUICKACK, libc::c_int::from(on))
}

/// What a non-blocking poll(2) says about the socket right now:
/// (no more to read: FIN or hang-up, socket has an error).
pub fn closed_or_failed(fd: RawFd) -> io::Result<(bool, bool)> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    if unsafe { libc::poll(&raw mut p, 1, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let failed = p.revents & (libc::POLLERR | libc::POLLNVAL) != 0;
    Ok((p.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0, failed))
}
