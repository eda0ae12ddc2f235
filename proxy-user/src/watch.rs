//! Waiting for FIN and RST on sockets the kernel splices, without waking on
//! every packet.
//!
//! tokio registers sockets for EPOLLIN|EPOLLOUT, and a spliced socket's
//! data-ready and write-space callbacks fire for every skb the verdict
//! program moves, so tokio's epoll would wake thousands of times a second
//! during a bulk transfer. This watcher's epoll set asks for EPOLLRDHUP
//! only (EPOLLERR and EPOLLHUP are always reported): the kernel does not
//! even wake it for data, only for a FIN or an error.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::OnceLock,
};

/// The epoll set; its thread wakes the connection (park.rs) whose token
/// an event carries.
pub struct Watcher {
    epoll: OwnedFd,
}

impl Watcher {
    /// The process-wide watcher, with its thread started on first use.
    pub fn get() -> io::Result<&'static Watcher> {
        static WATCHER: OnceLock<Watcher> = OnceLock::new();
        if let Some(w) = WATCHER.get() {
            return Ok(w);
        }
        // SAFETY: epoll_create1 has no preconditions; the fd is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut fresh = false;
        let w = WATCHER.get_or_init(|| {
            fresh = true;
            Watcher { epoll }
        });
        if fresh {
            std::thread::Builder::new()
                .name("splice-watch".into())
                .spawn(move || w.run())?;
        }
        Ok(w)
    }

    fn run(&self) {
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
                crate::park::wake(ev.u64);
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
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Before `fd` closes (and its number can be reused).
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
