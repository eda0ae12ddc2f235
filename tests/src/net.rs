//! Socket helpers shared by the multi-hop tests, where every hop has its
//! own loopback address and who connected from where is what is checked.
use std::{
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::STEP;

/// Shorthand: the tests speak IPv4 loopback addresses throughout.
pub fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// Bytes as printable ASCII, for error messages about binary data.
pub fn show(b: &[u8]) -> String {
    b.escape_ascii().to_string()
}

/// A TCP connection to `to` from the local address `from` (any port), with
/// reads and writes bounded by STEP so a stuck hop fails the test.
pub fn connect_from(from: Ipv4Addr, to: SocketAddr) -> Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&v4(from, 0).into())?;
    sock.connect_timeout(&to.into(), Duration::from_secs(5))
        .with_context(|| format!("connect {from} -> {to}"))?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(STEP))?;
    s.set_write_timeout(Some(STEP))?;
    Ok(s)
}

/// The local address of a connected socket (which client port it got).
pub fn local(s: &TcpStream) -> SocketAddr {
    s.local_addr().expect("local_addr")
}

/// Accepts one connection within `timeout`, or None, so a test can also
/// check that nothing connected. The stream has STEP-bounded I/O.
pub fn accept_within(l: &TcpListener, timeout: Duration) -> Result<Option<TcpStream>> {
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(STEP))?;
                s.set_write_timeout(Some(STEP))?;
                return Ok(Some(s));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(10));
    }
}
