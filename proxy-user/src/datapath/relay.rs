//! The userspace relay: the fallback when the kernel cannot carry a
//! direction (or a whole connection), with the same half-close and reset
//! semantics as the kernel path.
use std::{
    io,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use tokio::{io::Interest, net::TcpStream, sync::watch};

use super::carried::{drive, End, Read, Totals};
use crate::{
    drain::Drain,
    metrics::{Direction, ListenerMetrics},
    net::{self, write_all},
};

/// Both directions relayed in userspace until the connection ends; `early`
/// bytes were already forwarded.
pub async fn relay(
    drain: &Drain,
    metrics: &ListenerMetrics,
    client: &TcpStream,
    upstream: &TcpStream,
    early: Read,
) -> Totals {
    let (c2u, u2c) = (AtomicU64::new(early.c2u), AtomicU64::new(early.u2c));
    relay_rest(drain, metrics, client, upstream, (&c2u, &u2c), (Step::Open, Step::Open)).await
}

/// Relays until the connection ends, from where each direction stands:
/// one that already ended keeps its end, an open one is copied (it holds
/// no bytes). `counts` already hold what was forwarded each way.
async fn relay_rest(
    drain: &Drain,
    metrics: &ListenerMetrics,
    client: &TcpStream,
    upstream: &TcpStream,
    (c2u, u2c): (&AtomicU64, &AtomicU64),
    (c2u_step, u2c_step): (Step, Step),
) -> Totals {
    let rest = |step, src, dst, bytes, metric| async move {
        match step {
            Step::Ended(end) => end,
            Step::Open => user_direction(src, dst, bytes, metric).await,
        }
    };
    let outcome = drive(
        drain,
        rest(c2u_step, client, upstream, c2u, metrics.user_bytes(Direction::client_to_upstream)),
        rest(u2c_step, upstream, client, u2c, metrics.user_bytes(Direction::upstream_to_client)),
        wait_reset(client),
        wait_reset(upstream),
    )
    .await;
    outcome.pass_on(client, upstream);
    Totals {
        c2u: c2u.load(Relaxed),
        u2c: u2c.load(Relaxed),
        kernel: 0,
        outcome,
    }
}

pub(super) const BUF_SIZE: usize = 64 * 1024;

/// `--handoff auto`: relays both directions in userspace, like `relay`,
/// until the connection shows it is worth the kernel's two psocks: it went
/// IDLE with nothing moving (an MQTT client between packets: it is then
/// parked at about 100 bytes), or one direction read BULK full buffers in a
/// row (a stream faster than userspace drains it). Then both directions
/// stop between reads, with every byte read already written, and Err says
/// what userspace carried, for the kernel to take over from. A connection
/// that ends first (or a drain) is finished here: Ok.
pub async fn relay_or_promote(
    drain: &Drain,
    metrics: &ListenerMetrics,
    client: &TcpStream,
    upstream: &TcpStream,
    early: Read,
) -> Result<Totals, Read> {
    let (c2u, u2c) = (AtomicU64::new(early.c2u), AtomicU64::new(early.u2c));
    let (c2u_metric, u2c_metric) = (
        metrics.user_bytes(Direction::client_to_upstream),
        metrics.user_bytes(Direction::upstream_to_client),
    );
    let (stop, stopped) = watch::channel(false);
    let direction = |src, dst, bytes, metric| {
        let mut stopped = stopped.clone();
        let stop = &stop;
        async move {
            let end = copy(src, dst, bytes, metric, Some(&mut stopped)).await;
            // A direction that ended, or wants the kernel, ends the phase.
            stop.send_replace(true);
            end
        }
    };
    let both = async {
        tokio::join!(
            direction(client, upstream, &c2u, c2u_metric),
            direction(upstream, client, &u2c, u2c_metric)
        )
    };
    tokio::pin!(both);
    let drained = drain.forced();
    tokio::pin!(drained);
    let mut draining = false;
    let mut moved = c2u.load(Relaxed) + u2c.load(Relaxed);
    let (c2u_step, u2c_step) = loop {
        tokio::select! {
            steps = &mut both => break steps,
            () = tokio::time::sleep(IDLE) => {
                let now = c2u.load(Relaxed) + u2c.load(Relaxed);
                if now == moved {
                    stop.send_replace(true);
                }
                moved = now;
            }
            () = &mut drained, if !draining => {
                draining = true;
                stop.send_replace(true);
            }
        }
    };
    let (c2u_now, u2c_now) = (c2u.load(Relaxed), u2c.load(Relaxed));
    if let (Step::Open, Step::Open) = (c2u_step, u2c_step) {
        // A parked connection keeps these counts in 32 bits (park.rs); one
        // that carried more in userspace stays there.
        if !drain.is_forced() && c2u_now.max(u2c_now) < u64::from(u32::MAX) {
            return Err(Read {
                consumed: early.consumed,
                c2u: c2u_now,
                u2c: u2c_now,
            });
        }
    }
    Ok(relay_rest(drain, metrics, client, upstream, (&c2u, &u2c), (c2u_step, u2c_step)).await)
}

/// How long a `--handoff auto` connection may go with no byte either way
/// before the kernel takes it over. Shorter than MQTT keep-alive intervals
/// (tens of seconds), longer than the gaps of a connection that is busy.
const IDLE: Duration = Duration::from_secs(2);

/// How many full buffers (64 KiB each) in a row make a direction a bulk
/// stream under `--handoff auto`: 1 MiB that arrived faster than it was
/// read. Small MQTT packets, even at a high rate, rarely fill one.
const BULK: u32 = 16;

/// Where a relayed direction stands.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Open, stopped between reads with nothing held: userspace or the
    /// kernel may carry it on.
    Open,
    Ended(End),
}

/// Copies `src` to `dst` until EOF, then half-closes `dst`. `bytes` counts
/// what was passed on, and stays right if this future is dropped mid-way.
/// `metric` is the listener's live byte counter.
pub async fn user_direction(
    src: &TcpStream,
    dst: &TcpStream,
    bytes: &AtomicU64,
    metric: &Counter,
) -> End {
    match copy(src, dst, bytes, metric, None).await {
        Step::Ended(end) => end,
        Step::Open => unreachable!("a relay with no stop signal never stops"),
    }
}

/// `user_direction`, and, given `stop`, the phase of `relay_or_promote`:
/// returns Open when `stop` turns true while no bytes are held, or by
/// itself after BULK full buffers in a row.
async fn copy(
    src: &TcpStream,
    dst: &TcpStream,
    bytes: &AtomicU64,
    metric: &Counter,
    mut stop: Option<&mut watch::Receiver<bool>>,
) -> Step {
    let mut full_in_a_row = 0;
    loop {
        let readable = async {
            match stop.as_deref_mut() {
                // Biased: a stop wins over more bytes, so a stream cannot
                // keep the connection in userspace.
                Some(stop) => tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => None,
                    r = src.readable() => Some(r),
                },
                None => Some(src.readable().await),
            }
        };
        match readable.await {
            None => return Step::Open,
            Some(Err(_)) => return Step::Ended(End::SrcReset),
            Some(Ok(())) => {}
        }
        loop {
            let n = match read_and_write(src, dst) {
                Ok(Moved::Eof) => return Step::Ended(half_close(dst)),
                Ok(Moved::Drained) => break,
                Ok(Moved::All(n)) => n,
                Ok(Moved::Part(n, rest)) => {
                    // dst is full: only now does this connection hold a
                    // buffer of its own, until dst takes the rest.
                    if write_all(dst, &rest).await.is_err() {
                        return Step::Ended(End::DstFailed);
                    }
                    n
                }
                Err(end) => return Step::Ended(end),
            };
            bytes.fetch_add(n as u64, Relaxed);
            metric.inc_by(n as u64);
            if let Some(stop) = &stop {
                full_in_a_row = if n == BUF_SIZE { full_in_a_row + 1 } else { 0 };
                if full_in_a_row >= BULK || *stop.borrow() {
                    return Step::Open;
                }
            }
        }
    }
}

/// What one `read_and_write` did.
pub(super) enum Moved {
    /// src had nothing more to read.
    Drained,
    /// src sent its FIN.
    Eof,
    /// Read this many bytes and wrote them all.
    All(usize),
    /// Read this many; dst took only part, and these are the rest.
    Part(usize, Vec<u8>),
}

std::thread_local! {
    /// The runtime thread's one relay buffer. A read and the write of what
    /// it read happen without an await in between, so every connection on
    /// the thread can share it: a relayed connection holds no buffer of
    /// its own unless its destination is full, and an MQTT packet costs no
    /// 64 KiB allocation.
    pub(super) static BUF: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0u8; BUF_SIZE].into_boxed_slice());
}

/// One read from `src` into the thread's buffer, and as much of it written
/// to `dst` as it takes now; Err says how the direction ended.
fn read_and_write(src: &TcpStream, dst: &TcpStream) -> Result<Moved, End> {
    BUF.with_borrow_mut(|buf| {
        let n = match src.try_read(buf) {
            Ok(0) => return Ok(Moved::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Moved::Drained),
            Err(_) => return Err(End::SrcReset),
        };
        pass(&buf[..n], dst)
    })
}

/// Writes as much of `data` (just read) to `dst` as it takes now: All, or
/// Part with a copy of the rest.
pub(super) fn pass(data: &[u8], dst: &TcpStream) -> Result<Moved, End> {
    let mut done = 0;
    while done < data.len() {
        match dst.try_write(&data[done..]) {
            Ok(k) => done += k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Ok(Moved::Part(data.len(), data[done..].to_vec()))
            }
            Err(_) => return Err(End::DstFailed),
        }
    }
    Ok(Moved::All(data.len()))
}

pub(super) fn half_close(dst: &TcpStream) -> End {
    match net::half_close(dst) {
        Ok(()) => End::Fin,
        Err(_) => End::DstFailed,
    }
}

/// Resolves only if `sock` gets reset. Used once a direction has passed its
/// FIN on, so that an RST arriving later still reaches the other side.
/// Waits on ERROR alone: tokio keeps read-closed readiness set for good
/// after a FIN, so waiting on READABLE here would spin.
pub async fn wait_reset(sock: &TcpStream) -> End {
    loop {
        match sock.ready(Interest::ERROR).await {
            Err(_) => return End::SrcReset,
            Ok(_) => {
                if matches!(sock.take_error(), Ok(Some(_)) | Err(_)) {
                    return End::SrcReset;
                }
                let _ = sock.try_io(Interest::ERROR, || {
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
            }
        }
    }
}
