//! The sockmap offload: the kernel carries a connection's bytes between
//! its two sockets, and userspace only looks at them again on FIN, RST or
//! a flow-control signal.
//!
//! - maps.rs: the eBPF program and its maps;
//! - budget.rs: what each kernel-carried direction may hold, within
//!   `--max-buffered`;
//! - splice.rs: handing two sockets to the kernel, and one kernel-carried
//!   direction (`Flow`) up to its FIN;
//! - park.rs: connections carried both ways, parked with no task;
//! - epoll.rs: FIN/RST wake-ups without a wake-up per packet;
//! - sockopt.rs: the socket options std, tokio and socket2 lack.
//!
//! `Kernel` wires them: the program's signals and the epoll set's events
//! both wake the park.
mod budget;
mod epoll;
mod layout;
mod maps;
mod park;
mod sockopt;
mod splice;

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    sync::{atomic::AtomicU64, atomic::Ordering::Relaxed, Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::{net::TcpStream, sync::watch};

use self::{
    budget::{Budget, Grant},
    epoll::Epoll,
    maps::Maps,
    park::{Park, ToPark},
    splice::Flow,
};
use super::{
    carried::{drive, Carried, End, Read, Totals},
    relay,
};
use crate::{
    drain::Drain,
    metrics::{Direction, Metrics, Path},
};

pub struct Kernel {
    maps: Arc<Maps>,
    budget: Arc<Budget>,
    epoll: Arc<Epoll>,
    park: Arc<Park>,
    drain: Arc<Drain>,
    /// When a refused handoff was last logged as a warning.
    refusal_warned: Mutex<Option<Instant>>,
}

impl Kernel {
    /// Loads the program and starts what wakes parked connections. Called
    /// inside the runtime.
    /// `max_buffered`: the budget's cap (None: `Budget::default_cap`).
    pub fn load(level: log::LevelFilter, max_buffered: Option<u64>, drain: Arc<Drain>) -> Result<Kernel> {
        let (maps, events) = Maps::load(level)?;
        let maps = Arc::new(maps);
        let budget = Arc::new(Budget::new(max_buffered.unwrap_or_else(Budget::default_cap)));
        let epoll = Arc::new(Epoll::new().context("starting the splice watcher")?);
        let park = Arc::new(Park::new(maps.clone(), budget.clone(), epoll.clone(), drain.clone()));
        tokio::spawn(park.clone().sweep());
        let p = park.clone();
        events.dispatch(move |token| p.wake(token))?;
        let (p, e) = (park.clone(), epoll.clone());
        std::thread::Builder::new()
            .name("splice-watch".into())
            .spawn(move || e.run(|token| p.wake(token)))
            .context("starting the splice watcher")?;
        Ok(Kernel {
            maps,
            budget,
            epoll,
            park,
            drain,
            refusal_warned: Mutex::default(),
        })
    }

    /// A full map refuses every handoff until connections close: warn
    /// once in a while, not once a connection (they are all counted in
    /// `splicer_kernel_handoffs_refused_total`).
    fn warn_refused(&self, e: &anyhow::Error) {
        const EVERY: Duration = Duration::from_secs(10);
        let mut last = self.refusal_warned.lock().unwrap();
        if last.is_none_or(|t| t.elapsed() >= EVERY) {
            *last = Some(Instant::now());
            log::warn!("the kernel refused a connection, relaying it in userspace (warned at most every {EVERY:?}): {e:#}");
        } else {
            log::debug!("the kernel refused a connection, relaying it in userspace: {e:#}");
        }
    }

    pub fn prog_id(&self) -> u32 {
        self.maps.prog_id
    }

    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// The end of a drain: parked connections have no task waiting on the
    /// drain, so each is woken to see it.
    pub fn wake_all(&self) {
        self.park.wake_all();
    }

    /// Publishes what open connections have redirected so far.
    pub fn publish_kernel_bytes(&self, metrics: &Metrics) {
        self.park.publish_kernel_bytes(metrics);
    }

    /// Hands the connection to the kernel. Both directions spliced: it is
    /// parked (Ok(None); its owner hears of the end). One side already
    /// half-closed: the kernel carries the other direction and userspace
    /// this one, in this task. Refused: the userspace relay carries it all.
    /// `read` says what userspace took of each side before.
    pub async fn carry(&self, conn: Carried, read: Read) -> io::Result<Option<Totals>> {
        let Carried {
            client,
            upstream,
            who,
            started,
            owner,
        } = conn;
        let m = owner.metrics();
        let token = self.park.token();
        let handoff = match splice::handoff(&self.maps, &client, &upstream, token) {
            Ok(h) => h,
            Err(e) => {
                self.park.release(token);
                m.handoff_refused.inc();
                self.warn_refused(&e);
                m.offloaded(Path::userspace);
                return Ok(Some(relay::relay(&self.drain, m, &client, &upstream, read).await));
            }
        };
        let (c, u) = handoff.cookies;
        if handoff.client_spliced && handoff.upstream_spliced {
            // The kernel carries both ways: park it, with no task at all.
            m.offloaded(Path::kernel);
            let parked = self.park.start(
                token,
                ToPark {
                    client,
                    upstream,
                    handoff: &handoff,
                    read,
                    started,
                    who,
                    owner: owner.clone(),
                },
            );
            return match parked {
                Ok(()) => Ok(None),
                Err(e) => {
                    // The sockets are gone with the error; nothing to relay.
                    splice::forget(&self.maps, (c, u));
                    self.park.release(token);
                    Err(e)
                }
            };
        }
        // One side half-closed before the handoff: the kernel carries the
        // other direction, userspace this one, in this task.
        m.offloaded(Path::userspace);
        let mut wake = self.park.waiter(token);
        let watched = self.epoll.add(client.as_raw_fd(), token);
        if let Err(e) = watched.and_then(|()| self.epoll.add(upstream.as_raw_fd(), token)) {
            // Closed (out of the sockhashes and the epoll set) before their
            // links go, as at the end below.
            drop((client, upstream));
            splice::forget(&self.maps, (c, u));
            self.park.release(token);
            return Err(e);
        }
        let (c2u_user, u2c_user) = (AtomicU64::new(read.c2u), AtomicU64::new(read.u2c));
        let kernel_c2u = Flow::new(&self.maps, client.as_fd(), upstream.as_fd(), c, handoff.upstream_base)
            .consumed(read.consumed + read.c2u);
        let kernel_u2c = Flow::new(&self.maps, upstream.as_fd(), client.as_fd(), u, handoff.client_base)
            .consumed(read.u2c);
        let (w1, w2, w3) = (wake.clone(), wake.clone(), wake.clone());
        let c2u_bytes = m.user_bytes(Direction::client_to_upstream);
        let u2c_bytes = m.user_bytes(Direction::upstream_to_client);
        let outcome = drive(
            &self.drain,
            async {
                match handoff.client_spliced {
                    true => kernel_direction(&kernel_c2u, w1).await,
                    false => relay::user_direction(&client, &upstream, &c2u_user, c2u_bytes).await,
                }
            },
            async {
                match handoff.upstream_spliced {
                    true => kernel_direction(&kernel_u2c, w2).await,
                    false => relay::user_direction(&upstream, &client, &u2c_user, u2c_bytes).await,
                }
            },
            reset_after_fin(&client, handoff.client_spliced, w3),
            reset_after_fin(&upstream, handoff.upstream_spliced, {
                wake.mark_unchanged();
                wake
            }),
        )
        .await;
        outcome.pass_on(&client, &upstream);
        self.epoll.remove(client.as_raw_fd());
        self.epoll.remove(upstream.as_raw_fd());
        drop((client, upstream));
        // Both sockets are closed (so out of the sockhashes) before their links go.
        let (c_link, u_link) = splice::forget(&self.maps, (c, u));
        self.park.release(token);
        m.kernel.add_closed(c_link.redirected, u_link.redirected);
        Ok(Some(Totals {
            c2u: c2u_user.load(Relaxed) + c_link.redirected,
            u2c: u2c_user.load(Relaxed) + u_link.redirected,
            kernel: c_link.redirected + u_link.redirected,
            outcome,
        }))
    }
}

/// A kernel-carried direction in a task: looks at it after every wake-up.
/// Its grant stays at the floor: nothing would give it back while idle.
async fn kernel_direction(d: &Flow<'_>, mut wake: watch::Receiver<()>) -> End {
    let mut grant = Grant::FLOOR;
    loop {
        if let Some(end) = d.advance(&mut grant).await {
            return end;
        }
        if wake.changed().await.is_err() {
            return End::DstFailed;
        }
    }
}

/// Resolves if `sock` is reset after its FIN was passed on.
async fn reset_after_fin(sock: &TcpStream, spliced: bool, mut wake: watch::Receiver<()>) -> End {
    if !spliced {
        return relay::wait_reset(sock).await;
    }
    loop {
        if splice::was_reset(sock.as_fd()) {
            return End::SrcReset;
        }
        if wake.changed().await.is_err() {
            return End::SrcReset;
        }
    }
}
