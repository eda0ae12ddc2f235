//! Connections the kernel carries in both directions, parked between
//! events. An idle MQTT connection can stay open for days; parked, it
//! costs one slot of this table (about 80 bytes) and no task, no buffer,
//! no registration anywhere else in userspace.
//!
//! A connection's token is its slot number. The epoll set (epoll.rs)
//! reports a FIN, RST or HUP on either socket with the token, and the
//! verdict program reports a flow-control signal with it (Link::token);
//! kernel/mod.rs wires both to `Park::wake`, which hands the connection to
//! a task that does what its sockets call for (splice::Flow::advance) and
//! parks it again, or closes it and tells its Owner.
//! Connections that are only half in the kernel (one side half-closed
//! before the handoff) run as ordinary tasks and get their wake-ups through
//! a watch channel registered here.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd, RawFd},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use tokio::{net::TcpStream as TokioStream, runtime::Handle, sync::watch};

use super::{
    budget::{self, Budget, Grant},
    epoll::Epoll,
    maps::Maps,
    sockopt,
    splice::{self, Flow, Handoff},
};
use crate::{
    datapath::carried::{ClientAddrs, End, Outcome, Owner, Read, Totals},
    drain::Drain,
    metrics::{KernelBytes, LiveBytes, Metrics},
};

/// A fully spliced connection, as compact as it can be: it is all that
/// remains of an idle one.
pub struct Spliced {
    client: std::net::TcpStream,
    upstream: std::net::TcpStream,
    /// Send-queue totals at the handoff (see splice::Flow).
    client_base: u64,
    upstream_base: u64,
    /// Bytes userspace took before the handoff (see datapath::Read): the
    /// client's PROXY header or upgrade request, the client bytes it then
    /// forwarded, and the upstream bytes it forwarded (the broker's 101).
    header: u32,
    early: u32,
    up_early: u32,
    /// Milliseconds since the park was made (`Park.start`), for the close
    /// line's duration.
    started: u64,
    who: Who,
    ends: Ends,
    /// Each direction's grant (budget.rs), packed.
    grants: u8,
    owner: Arc<dyn Owner>,
}

/// What the park is handed for a connection whose both directions the
/// kernel now carries.
pub struct ToPark<'a> {
    pub client: TokioStream,
    pub upstream: TokioStream,
    pub handoff: &'a Handoff,
    pub read: Read,
    pub started: Instant,
    pub who: ClientAddrs,
    pub owner: Arc<dyn Owner>,
}

/// Slot states besides "parked" (a Some in `slots`).
const FREE: u8 = 0;
/// A task holds the connection; no event has come since it took it.
const BUSY: u8 = 1;
/// A task holds the connection and an event came meanwhile: it must look
/// again before parking.
const PENDING: u8 = 2;
const PARKED: u8 = 3;
/// A half-relayed connection's task, woken through `waiters`.
const WAITER: u8 = 4;

#[derive(Default)]
struct Table {
    slots: Vec<Option<Spliced>>,
    state: Vec<u8>,
    free: Vec<u32>,
    waiters: HashMap<u64, watch::Sender<()>>,
    /// IPv6 (and other non-IPv4) addresses of parked connections, which do
    /// not fit in Who.
    wide: HashMap<u64, ClientAddrs>,
    /// The sockets of connections a task holds (not in `slots`), so that a
    /// scrape counts their bytes too.
    busy: HashMap<u64, Counted>,
}

/// What a scrape reads of one connection: its sockets and its listener's
/// kernel byte counters.
type Counted = (RawFd, RawFd, Arc<KernelBytes>);

impl Spliced {
    fn counted(&self) -> Counted {
        (self.client.as_raw_fd(), self.upstream.as_raw_fd(), self.owner.metrics().kernel.clone())
    }
}

/// The table of kernel-carried connections, and what their tasks need.
pub struct Park {
    table: Mutex<Table>,
    /// Held for writing while a connection closes, for reading while a
    /// scrape reads the parked connections' sockets.
    closing: RwLock<()>,
    maps: Arc<Maps>,
    budget: Arc<Budget>,
    epoll: Arc<Epoll>,
    drain: Arc<Drain>,
    /// Where wake-ups spawn their tasks (the epoll thread is not in it).
    runtime: Handle,
    /// The zero of `Spliced::started`.
    start: Instant,
}

impl Park {
    /// Made inside the runtime, before any connection is handed off.
    pub fn new(maps: Arc<Maps>, budget: Arc<Budget>, epoll: Arc<Epoll>, drain: Arc<Drain>) -> Park {
        Park {
            table: Mutex::default(),
            closing: RwLock::default(),
            maps,
            budget,
            epoll,
            drain,
            runtime: Handle::current(),
            start: Instant::now(),
        }
    }

    /// A new token; the caller holds the connection (BUSY) until it parks it.
    pub fn token(&self) -> u64 {
        let mut t = self.table.lock().unwrap();
        let i = match t.free.pop() {
            Some(i) => i as usize,
            None => {
                t.slots.push(None);
                t.state.push(FREE);
                t.slots.len() - 1
            }
        };
        t.state[i] = BUSY;
        i as u64
    }

    /// Gives the token back (a connection that never parked).
    pub fn release(&self, token: u64) {
        free(&mut self.table.lock().unwrap(), token);
    }

    /// Registers a half-relayed connection's task for its wake-ups.
    pub fn waiter(&self, token: u64) -> watch::Receiver<()> {
        let (tx, rx) = watch::channel(());
        let mut t = self.table.lock().unwrap();
        t.state[token as usize] = WAITER;
        t.waiters.insert(token, tx);
        rx
    }

    /// An event for `token`: FIN/RST/HUP on one of its sockets, or a
    /// flow-control signal. Stale tokens (a slot reused since) only cause a
    /// harmless extra look at the sockets.
    pub fn wake(self: &Arc<Self>, token: u64) {
        let mut t = self.table.lock().unwrap();
        let i = token as usize;
        match t.state.get(i).copied() {
            Some(BUSY) => t.state[i] = PENDING,
            Some(PARKED) => {
                let Some(conn) = t.slots[i].take() else {
                    return;
                };
                t.state[i] = BUSY;
                t.busy.insert(token, conn.counted());
                self.runtime.spawn(self.clone().run(token, conn));
            }
            Some(WAITER) => {
                if let Some(tx) = t.waiters.get(&token) {
                    tx.send_replace(());
                }
            }
            _ => {}
        }
    }

    /// The end of a drain: every parked connection is woken to close.
    pub fn wake_all(self: &Arc<Self>) {
        let n = self.table.lock().unwrap().state.len();
        for token in 0..n as u64 {
            self.wake(token);
        }
    }

    /// Wakes, every `SWEEP`, the parked connections whose grants are above
    /// the floor, so that an idle one gives its grant back (see budget.rs).
    pub async fn sweep(self: Arc<Self>) {
        let mut every = tokio::time::interval(budget::SWEEP);
        loop {
            every.tick().await;
            let granted: Vec<u64> = {
                let t = self.table.lock().unwrap();
                t.slots
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.as_ref().is_some_and(|c| c.grants != 0))
                    .map(|(i, _)| i as u64)
                    .collect()
            };
            for token in granted {
                self.wake(token);
            }
        }
    }

    /// Hands a freshly spliced connection to the table and parks it.
    /// Nothing is missed: adding a socket to the epoll set reports a FIN or
    /// RST that came before, and a flow-control signal during the handoff
    /// left the slot PENDING, which sends it to a task at once.
    pub fn start(self: &Arc<Self>, token: u64, c: ToPark<'_>) -> std::io::Result<()> {
        let conn = Spliced {
            // Out of tokio's epoll, which would wake for every skb.
            client: c.client.into_std()?,
            upstream: c.upstream.into_std()?,
            client_base: c.handoff.client_base,
            upstream_base: c.handoff.upstream_base,
            header: u32::try_from(c.read.consumed).unwrap_or(u32::MAX),
            early: u32::try_from(c.read.c2u).unwrap_or(u32::MAX),
            up_early: u32::try_from(c.read.u2c).unwrap_or(u32::MAX),
            started: c.started.saturating_duration_since(self.start).as_millis() as u64,
            who: self.who(token, c.who),
            ends: Ends::default(),
            grants: Grant::pack([Grant::FLOOR; 2]),
            owner: c.owner,
        };
        for s in [&conn.client, &conn.upstream] {
            self.epoll.add(s.as_raw_fd(), token)?;
        }
        self.table.lock().unwrap().busy.insert(token, conn.counted());
        if let Err(conn) = self.park(token, conn) {
            self.runtime.spawn(self.clone().run(token, conn));
        }
        Ok(())
    }

    /// Parks the connection, unless an event came while it was held.
    fn park(&self, token: u64, conn: Spliced) -> Result<(), Spliced> {
        let mut t = self.table.lock().unwrap();
        let i = token as usize;
        if t.state[i] == PENDING {
            t.state[i] = BUSY;
            return Err(conn);
        }
        t.slots[i] = Some(conn);
        t.state[i] = PARKED;
        t.busy.remove(&token);
        Ok(())
    }

    /// Works on the connection until it parks or ends.
    async fn run(self: Arc<Self>, token: u64, mut conn: Spliced) {
        loop {
            if let Some((outcome, cookies)) = self.advance(&mut conn).await {
                self.finish(token, conn, outcome, cookies);
                return;
            }
            match self.park(token, conn) {
                Ok(()) => return,
                Err(c) => conn = c,
            }
        }
    }

    /// Both directions, as far as their sockets' states allow; once the
    /// connection is over, how it ended and the sockets' cookies.
    async fn advance(&self, c: &mut Spliced) -> Option<(Outcome, (u64, u64))> {
        let (Ok(cc), Ok(uc)) = (
            sockopt::cookie(c.client.as_raw_fd()),
            sockopt::cookie(c.upstream.as_raw_fd()),
        ) else {
            return Some((Outcome::Error, (0, 0)));
        };
        if self.drain.is_forced() {
            return Some((Outcome::Drained, (cc, uc)));
        }
        let (maps, budget) = (&*self.maps, &*self.budget);
        let c2u = Flow::new(maps, c.client.as_fd(), c.upstream.as_fd(), cc, c.upstream_base)
            .consumed(u64::from(c.header) + u64::from(c.early))
            .growing(budget);
        let u2c = Flow::new(maps, c.upstream.as_fd(), c.client.as_fd(), uc, c.client_base)
            .consumed(u64::from(c.up_early))
            .growing(budget);
        let [mut g0, mut g1] = Grant::unpack(c.grants);
        let (a, b) = tokio::join!(
            direction(c2u, c.ends.get(0), &mut g0),
            direction(u2c, c.ends.get(1), &mut g1)
        );
        c.grants = Grant::pack([g0, g1]);
        c.ends.set(0, a);
        c.ends.set(1, b);
        Outcome::of(c.ends.get(0), c.ends.get(1), c.ends.first()).map(|o| (o, (cc, uc)))
    }

    /// Closes the sockets (which also takes them out of the epoll set and
    /// the sockhashes), forgets the links and tells the owner.
    fn finish(&self, token: u64, c: Spliced, outcome: Outcome, cookies: (u64, u64)) {
        outcome.pass_on(&c.client, &c.upstream);
        let elapsed = self.start.elapsed().saturating_sub(Duration::from_millis(c.started));
        let Spliced {
            client,
            upstream,
            early,
            up_early,
            who,
            grants,
            owner,
            ..
        } = c;
        let (cl, ul) = {
            // The bytes move from live to closed while no scrape is reading.
            let _closing = self.closing.write().unwrap();
            // No scrape reads the sockets once they are closed (their
            // numbers may be reused at once).
            self.table.lock().unwrap().busy.remove(&token);
            // Both sockets closed (so out of the sockhashes) before their
            // links go.
            drop((client, upstream));
            for g in Grant::unpack(grants) {
                self.budget.release(g);
            }
            let links = splice::forget(&self.maps, cookies);
            owner.metrics().kernel.add_closed(links.0.redirected, links.1.redirected);
            links
        };
        let addrs = {
            let mut t = self.table.lock().unwrap();
            let addrs = who.addrs(&t, token);
            free(&mut t, token);
            addrs
        };
        let totals = Totals {
            c2u: u64::from(early) + cl.redirected,
            u2c: u64::from(up_early) + ul.redirected,
            kernel: cl.redirected + ul.redirected,
            outcome,
        };
        owner.closed(addrs, &totals, elapsed);
    }

    /// Publishes what the connections carried both ways, parked or held
    /// by a task, have redirected so far. The table is locked only to list
    /// their sockets; the reads (two system calls a socket) run without it,
    /// so wake-ups and parking go on. No connection closes (`finish`)
    /// meanwhile: its sockets stay open, and its bytes cannot move from
    /// live to closed and count twice.
    pub fn publish_kernel_bytes(&self, metrics: &Metrics) {
        let _no_closing = self.closing.read().unwrap();
        let parked: Vec<Counted> = {
            let t = self.table.lock().unwrap();
            t.slots
                .iter()
                .flatten()
                .map(Spliced::counted)
                .chain(t.busy.values().cloned())
                .collect()
        };
        let read = |fd: RawFd| {
            sockopt::cookie(fd)
                .ok()
                .and_then(|k| self.maps.link(k))
                .map_or(0, |l| l.redirected)
        };
        let mut live = LiveBytes::default();
        for (client, upstream, kernel) in &parked {
            live.add(kernel, [read(*client), read(*upstream)]);
        }
        metrics.publish_kernel_bytes(&live);
    }

    /// The client's addresses, packed when IPv4, else kept in `wide`.
    fn who(&self, token: u64, addrs: ClientAddrs) -> Who {
        match (pack(addrs.peer), pack(addrs.real)) {
            (Some(peer), Some(client)) => Who { peer, client },
            _ => {
                self.table.lock().unwrap().wide.insert(token, addrs);
                Who {
                    peer: WIDE,
                    client: WIDE,
                }
            }
        }
    }
}

fn free(t: &mut Table, token: u64) {
    let i = token as usize;
    t.slots[i] = None;
    t.state[i] = FREE;
    t.waiters.remove(&token);
    t.wide.remove(&token);
    t.busy.remove(&token);
    t.free.push(i as u32);
}

/// One direction after a wake-up: on while open, and a reset of its source
/// after its FIN was passed on still counts.
async fn direction(d: Flow<'_>, end: Option<End>, grant: &mut Grant) -> Option<End> {
    match end {
        None => d.advance(grant).await,
        Some(End::Fin) if splice::was_reset(d.src()) => Some(End::SrcReset),
        other => other,
    }
}

/// Ends of both directions and which ended first, in one byte.
#[derive(Default, Clone, Copy)]
struct Ends(u8);

impl Ends {
    fn get(self, dir: u8) -> Option<End> {
        match (self.0 >> (dir * 2)) & 3 {
            1 => Some(End::Fin),
            2 => Some(End::SrcReset),
            3 => Some(End::DstFailed),
            _ => None,
        }
    }

    fn set(&mut self, dir: u8, end: Option<End>) {
        let (Some(end), None) = (end, self.get(dir)) else {
            if let (Some(e), Some(_)) = (end, self.get(dir)) {
                // A FIN that turned into a reset.
                self.0 = (self.0 & !(3 << (dir * 2))) | (code(e) << (dir * 2));
            }
            return;
        };
        self.0 |= code(end) << (dir * 2);
        if self.0 & 0x30 == 0 {
            self.0 |= 0x10 << dir;
        }
    }

    /// Who closed first, for when both ended normally.
    fn first(self) -> Outcome {
        match self.0 & 0x30 {
            0x20 => Outcome::UpstreamClosed,
            _ => Outcome::ClientClosed,
        }
    }
}

fn code(e: End) -> u8 {
    match e {
        End::Fin => 1,
        End::SrcReset => 2,
        End::DstFailed => 3,
    }
}

/// The client's addresses (TCP peer, real client) packed into 16 bytes
/// when IPv4; other families go to the table's `wide` map.
#[derive(Clone, Copy)]
struct Who {
    peer: u64,
    client: u64,
}

/// Marks a Who whose addresses are in `wide`.
const WIDE: u64 = u64::MAX;

impl Who {
    fn addrs(self, t: &Table, token: u64) -> ClientAddrs {
        match self.peer {
            WIDE => t.wide.get(&token).copied().unwrap_or(ClientAddrs {
                peer: unpack(0),
                real: unpack(0),
            }),
            _ => ClientAddrs {
                peer: unpack(self.peer),
                real: unpack(self.client),
            },
        }
    }
}

fn pack(a: SocketAddr) -> Option<u64> {
    match splicer_proto::trust::canonical(a.ip()) {
        IpAddr::V4(ip) => Some((u64::from(u32::from(ip)) << 16) | u64::from(a.port())),
        IpAddr::V6(_) => None,
    }
}

fn unpack(v: u64) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(((v >> 16) as u32).into()), v as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_connection_stays_small() {
        // The whole point of parking: keep an idle connection's slot small.
        assert!(std::mem::size_of::<Option<Spliced>>() <= 80);
    }

    #[test]
    fn ends_record_each_direction_and_who_closed_first() {
        let mut e = Ends::default();
        assert_eq!((e.get(0), e.get(1)), (None, None));
        e.set(1, Some(End::Fin));
        e.set(0, Some(End::Fin));
        assert_eq!((e.get(0), e.get(1), e.first()), (Some(End::Fin), Some(End::Fin), Outcome::UpstreamClosed));
        // A FIN that later turns into a reset.
        e.set(0, Some(End::SrcReset));
        assert_eq!(e.get(0), Some(End::SrcReset));
        let mut e = Ends::default();
        e.set(0, Some(End::DstFailed));
        assert_eq!((e.get(0), e.first()), (Some(End::DstFailed), Outcome::ClientClosed));
    }

    #[test]
    fn ipv4_addresses_pack_and_others_do_not() {
        let a: SocketAddr = "192.0.2.7:51234".parse().unwrap();
        assert_eq!(unpack(pack(a).unwrap()), a);
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:51234".parse().unwrap();
        assert_eq!(unpack(pack(mapped).unwrap()), a);
        assert!(pack("[2001:db8::1]:1".parse().unwrap()).is_none());
    }
}
