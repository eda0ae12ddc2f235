//! The userspace relay for one direction of a connection: the fallback when
//! the kernel cannot carry it, with the same half-close and reset semantics.
use std::{
    io,
    net::Shutdown,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use prometheus_client::metrics::counter::Counter;
use tokio::{io::Interest, net::TcpStream};

/// How one direction of a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// `src` sent FIN and it was passed on to `dst` after every byte.
    Fin,
    /// `src` was reset (RST) or failed.
    SrcReset,
    /// `dst` could not take more bytes (reset, or gone).
    DstFailed,
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
    match socket2::SockRef::from(dst).shutdown(Shutdown::Write) {
        Ok(()) => End::Fin,
        Err(_) => End::DstFailed,
    }
}

/// Forwards whatever `src` has queued right now, without waiting for more.
/// Used after reading a PROXY header: on Linux 6.x the verdict program is
/// handed whole skbs, so the rest of an skb whose front userspace consumed
/// would be spliced again from its start. Draining the queue leaves only
/// untouched skbs for the kernel.
pub async fn forward_queued(src: &TcpStream, dst: &TcpStream) -> io::Result<u64> {
    let mut buf = vec![0u8; BUF_SIZE];
    let mut total = 0u64;
    loop {
        match src.try_read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                write_all(dst, &buf[..n]).await?;
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(total),
            Err(e) => return Err(e),
        }
    }
}

pub async fn write_all(dst: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        dst.writable().await?;
        match dst.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
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

/// Makes closing `sock` send RST instead of FIN, to pass a reset on.
pub fn abort_on_close(sock: &impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(sock).set_linger(Some(std::time::Duration::ZERO));
}
