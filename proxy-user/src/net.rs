//! Small socket helpers shared by ingress (refusals: HTTP answers, MQTT
//! CONNACKs; a client's keep-alive) and the datapath (the relay, passing a
//! reset on).
use std::{io, os::fd::AsFd, time::Duration};

use tokio::net::TcpStream;

/// Writes all of `data`, waiting for room as needed. Takes `&TcpStream`
/// (tokio's `write_all` wants `&mut`) so both directions of a connection
/// can run at once on shared references.
pub async fn write_all(dst: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        dst.writable().await?;
        match dst.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Makes closing `sock` send RST instead of FIN, to pass a reset on.
pub fn abort_on_close(sock: &impl AsFd) {
    let _ = socket2::SockRef::from(sock).set_linger(Some(Duration::ZERO));
}

/// Sends FIN on `sock` (a half-close), whatever it was doing.
pub fn half_close(sock: &impl AsFd) -> io::Result<()> {
    socket2::SockRef::from(sock).shutdown(std::net::Shutdown::Write)
}

/// How long a client has to take a refusal (ours or the broker's).
const REFUSAL_WRITE: Duration = Duration::from_secs(5);

/// Writes a refusal (an HTTP answer, a CONNACK) and half-closes; a client
/// that reads nothing has REFUSAL_WRITE to take it, and does not hold the
/// connection longer.
pub async fn answer_and_close(client: &TcpStream, answer: &[u8]) {
    say_then_close(client, write_all(client, answer)).await;
}

/// answer_and_close for any way of writing the answer (over TLS, the
/// records and close_notify): `saying` gets REFUSAL_WRITE, then `client`
/// is closed gently whether it finished or not.
pub async fn say_then_close<T>(client: &TcpStream, saying: impl std::future::Future<Output = T>) {
    let _ = tokio::time::timeout(REFUSAL_WRITE, saying).await;
    close_gently(client);
}

/// Reads what is left of a refused request and half-closes, so the client
/// gets the answer and a FIN rather than a reset (closing a socket with
/// unread bytes makes the kernel send RST, which can destroy the answer).
pub fn close_gently(client: &TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    for _ in 0..16 {
        match client.try_read(&mut buf) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
    let _ = half_close(client);
}

/// Lets the kernel close a client that vanished, even while the kernel
/// carries its bytes: keep-alive probes after `idle` without a segment,
/// and TCP_USER_TIMEOUT so that probes (or data) unanswered for `limit`
/// end the connection with an error both directions see.
pub fn dead_peer_limit(sock: &impl AsFd, idle: Duration, limit: Duration) -> io::Result<()> {
    let s = socket2::SockRef::from(sock);
    // Linux takes at most 32767 s for either keep-alive time.
    let idle = idle.min(MAX_KEEPALIVE);
    // Probes every quarter of the idle time: the limit is overshot by at
    // most one interval.
    let interval = (idle / 4).max(Duration::from_secs(1));
    s.set_tcp_user_timeout(Some(limit))?;
    s.set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(idle).with_interval(interval))
}

const MAX_KEEPALIVE: Duration = Duration::from_secs(32767);
