//! The userspace relay: the fallback when the kernel cannot carry a
//! direction (or a whole connection), with the same half-close and reset
//! semantics as the kernel path.
use std::{
    io,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use prometheus_client::metrics::counter::Counter;
use tokio::{io::Interest, net::TcpStream};

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
    let outcome = drive(
        drain,
        user_direction(client, upstream, &c2u, metrics.user_bytes(Direction::client_to_upstream)),
        user_direction(upstream, client, &u2c, metrics.user_bytes(Direction::upstream_to_client)),
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

const BUF_SIZE: usize = 64 * 1024;

/// Copies `src` to `dst` until EOF, then half-closes `dst`. `bytes` counts
/// what was passed on, and stays right if this future is dropped mid-way.
/// `metric` is the listener's live byte counter.
pub async fn user_direction(
    src: &TcpStream,
    dst: &TcpStream,
    bytes: &AtomicU64,
    metric: &Counter,
) -> End {
    loop {
        if src.readable().await.is_err() {
            return End::SrcReset;
        }
        // The buffer lives only while bytes flow, so an idle connection
        // holds none (MQTT connections are idle most of the time).
        let mut buf = vec![0u8; BUF_SIZE];
        loop {
            let n = match src.try_read(&mut buf) {
                Ok(0) => return half_close(dst),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return End::SrcReset,
            };
            if write_all(dst, &buf[..n]).await.is_err() {
                return End::DstFailed;
            }
            bytes.fetch_add(n as u64, Relaxed);
            metric.inc_by(n as u64);
        }
    }
}

fn half_close(dst: &TcpStream) -> End {
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
