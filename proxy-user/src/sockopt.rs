//! The few socket options and ioctls that std, tokio and socket2 do not
//! expose. All of splicer's socket `unsafe` lives here.
use std::{io, mem, os::fd::RawFd};

/// Kernel TCP states (include/net/tcp_states.h) that matter here.
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_CLOSE_WAIT: u8 = 8;

/// The leading part of the kernel's `struct tcp_info`, up to the fields we
/// read. The kernel copies min(optlen, its size), so a prefix is fine.
#[repr(C)]
#[derive(Default)]
struct TcpInfoPrefix {
    state: u8,
    _u8s: [u8; 7],
    _u32s: [u32; 24],
    _pacing_rate: u64,
    _max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpInfo {
    pub state: u8,
    /// Bytes of ours the peer has acknowledged.
    pub bytes_acked: u64,
    /// Bytes received in sequence from the peer.
    pub bytes_received: u64,
}

pub fn tcp_info(fd: RawFd) -> io::Result<TcpInfo> {
    let mut info = TcpInfoPrefix::default();
    let mut len = mem::size_of::<TcpInfoPrefix>() as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes that outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < mem::size_of::<TcpInfoPrefix>() {
        return Err(io::Error::other(
            "kernel tcp_info too short (needs Linux 4.1+)",
        ));
    }
    Ok(TcpInfo {
        state: info.state,
        bytes_acked: info.bytes_acked,
        bytes_received: info.bytes_received,
    })
}

/// The socket's cookie: a stable 64-bit id the eBPF program can also read.
pub fn cookie(fd: RawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` is a writable u64 and `len` says so.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
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

/// Sets SO_RCVLOWAT. On TCP this also re-checks the receive queue and calls
/// the socket's data-ready callback if bytes are waiting, which is how bytes
/// that arrived before the socket joined the sockmap reach the verdict program.
pub fn set_rcvlowat(fd: RawFd, bytes: i32) -> io::Result<()> {
    // SAFETY: passes a readable int of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const bytes).cast(),
            mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Total bytes that have entered this socket's send queue since it opened:
/// acknowledged plus still queued. The two reads are not atomic; reading the
/// acknowledged count first can only under-count, never over-count.
pub fn bytes_queued_total(fd: RawFd) -> io::Result<(u8, u64)> {
    let info = tcp_info(fd)?;
    let queued = unacked_send_queue(fd)?;
    Ok((info.state, info.bytes_acked + queued))
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
    if unsafe { libc::poll(&mut p, 1, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let failed = p.revents & (libc::POLLERR | libc::POLLNVAL) != 0;
    Ok((p.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0, failed))
}

pub fn window_clamp(fd: RawFd) -> io::Result<i32> {
    let mut v: i32 = 0;
    let mut len = mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: writes one int of the stated size.
    if unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_WINDOW_CLAMP,
            (&raw mut v).cast(),
            &mut len,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

pub fn set_window_clamp(fd: RawFd, v: i32) -> io::Result<()> {
    // SAFETY: passes a readable int of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_WINDOW_CLAMP,
            (&raw const v).cast(),
            mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
