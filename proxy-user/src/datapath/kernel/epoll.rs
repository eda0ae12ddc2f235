//! Waiting for FIN and RST on sockets the kernel splices, without waking on
//! every packet.
//!
//! tokio registers sockets for EPOLLIN|EPOLLOUT, and a spliced socket's
//! data-ready and write-space callbacks fire for every skb the verdict
//! program moves, so tokio's epoll would wake thousands of times a second
//! during a bulk transfer. This epoll set asks for EPOLLRDHUP only
//! (EPOLLERR and EPOLLHUP are always reported): the kernel does not even
//! wake it for data, only for a FIN or an error.
// epoll has no safe wrapper in std, tokio or socket2; each call below says
// what it touches.
#![allow(unsafe_code)]
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

/// The epoll set; `run` reports each event's token.
pub struct Epoll {
    epoll: OwnedFd,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 has no preconditions; the fd is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Epoll { epoll })
    }

    /// Waits for events for good, calling `wake` with each one's token.
    /// Runs on a thread of its own (epoll_wait blocks).
    pub fn run(&self, wake: impl Fn(u64)) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        loop {
            // SAFETY: `events` is a writable array of the length we pass.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    -1,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("splice watcher stopped: {e}");
                return;
            }
            for ev in &events[..n as usize] {
                wake(ev.u64);
            }
        }
    }

    /// Reports FIN, RST and HUP on `fd` as a wake-up of `token`.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: token,
        };
        // SAFETY: registers a valid fd with our epoll; `ev` is read only.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &raw mut ev) } != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Before `fd` closes (and its number can be reused). A socket that
    /// simply closes leaves the set by itself.
    pub fn remove(&self, fd: RawFd) {
        // SAFETY: removes a registration; a missing one is harmless.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }
}
