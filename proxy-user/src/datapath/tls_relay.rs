//! The relay for TLS terminated here: the client's records are decrypted
//! into the runtime thread's relay buffer and written to the upstream, the
//! upstream's bytes read into it and encrypted to the client. Half-close
//! and resets as on the plain relay (carried::drive): the client's
//! close_notify (or FIN) becomes a FIN upstream, the upstream's FIN a
//! close_notify and FIN to the client, a reset either side resets both.
//!
//! Lean while idle: between reads a connection holds no buffer of ours,
//! only rustls's session (its receive buffer shrinks back to 4 KiB once
//! drained, and records it has sent are freed); while busy, 64 KiB reads.
use std::{
    io::{self, Read as _, Write as _},
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;

use super::{
    carried::{drive, End, Read, Totals},
    relay::{half_close, pass, wait_reset, Moved, BUF},
};
use crate::{
    drain::Drain,
    metrics::{Direction, ListenerMetrics},
    net::write_all,
    tls::conn::TlsConn,
};

/// Both directions until the connection ends; `early` bytes (plaintext)
/// were already forwarded.
pub async fn relay(drain: &Drain, metrics: &ListenerMetrics, client: &TlsConn, upstream: &TcpStream, early: Read) -> Totals {
    // What the upstream sends is encrypted and flushed before more is
    // read, so the session's send buffer holds at most one read's records.
    client.lock().set_buffer_limit(None);
    let (c2u, u2c) = (AtomicU64::new(early.c2u), AtomicU64::new(early.u2c));
    let outcome = drive(
        drain,
        from_client(client, upstream, &c2u, metrics.user_bytes(Direction::client_to_upstream)),
        to_client(upstream, client, &u2c, metrics.user_bytes(Direction::upstream_to_client)),
        wait_reset(client.tcp()),
        wait_reset(upstream),
    )
    .await;
    outcome.pass_on(client.tcp(), upstream);
    Totals {
        c2u: c2u.load(Relaxed),
        u2c: u2c.load(Relaxed),
        kernel: 0,
        outcome,
    }
}

/// Client to upstream: hands over every decrypted byte, then reads more
/// records; ends with a FIN upstream at the client's end of stream. A
/// failure (a bad record, a reset) still passes on what was decrypted
/// before it, then ends the connection.
async fn from_client(client: &TlsConn, upstream: &TcpStream, bytes: &AtomicU64, metric: &Counter) -> End {
    let mut failed = false;
    loop {
        let moved = BUF.with_borrow_mut(|buf| match client.lock().reader().read(buf) {
            Ok(0) => Ok(Moved::Eof),
            Ok(n) => pass(&buf[..n], upstream),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Moved::Drained),
            // A FIN without close_notify: MQTT clients often just close.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Moved::Eof),
            Err(_) => Err(End::SrcReset),
        });
        let n = match moved {
            Err(end) => return end,
            Ok(Moved::Eof) => return half_close(upstream),
            Ok(Moved::All(n)) => n,
            Ok(Moved::Part(n, rest)) => {
                if write_all(upstream, &rest).await.is_err() {
                    return End::DstFailed;
                }
                n
            }
            Ok(Moved::Drained) if failed => return End::SrcReset,
            Ok(Moved::Drained) => {
                // The end of the stream shows at the next read.
                failed = client.read_more().await.is_err();
                continue;
            }
        };
        bytes.fetch_add(n as u64, Relaxed);
        metric.inc_by(n as u64);
    }
}

/// Upstream to client: each read encrypted and sent before the next; the
/// upstream's FIN becomes close_notify and a FIN. Also sends the records
/// reading left unsent (`unsent`), so the client's side of the session
/// never waits on this direction.
async fn to_client(upstream: &TcpStream, client: &TlsConn, bytes: &AtomicU64, metric: &Counter) -> End {
    loop {
        tokio::select! {
            r = upstream.readable() => if r.is_err() {
                return End::SrcReset;
            },
            () = client.unsent.notified() => {
                if client.flush().await.is_err() {
                    return End::DstFailed;
                }
                continue;
            }
        }
        loop {
            let read = BUF.with_borrow_mut(|buf| match upstream.try_read(buf) {
                Ok(0) => Ok(Some(0)),
                Ok(n) => match client.lock().writer().write_all(&buf[..n]) {
                    Ok(()) => Ok(Some(n)),
                    Err(_) => Err(End::DstFailed),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(_) => Err(End::SrcReset),
            });
            match read {
                Err(end) => return end,
                Ok(None) => break,
                Ok(Some(0)) => {
                    return match client.close_write().await {
                        Ok(()) => End::Fin,
                        Err(_) => End::DstFailed,
                    }
                }
                Ok(Some(n)) => {
                    if client.flush().await.is_err() {
                        return End::DstFailed;
                    }
                    bytes.fetch_add(n as u64, Relaxed);
                    metric.inc_by(n as u64);
                    // Encrypting a stream that never pauses must not starve
                    // the client's direction or the thread's other tasks.
                    tokio::task::consume_budget().await;
                }
            }
        }
    }
}
