//! Small socket helpers shared by ingress (HTTP refusals) and the datapath
//! (the relay, passing a reset on).
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
