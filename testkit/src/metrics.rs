//! splicer's Prometheus endpoint, read as a scraper would.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};

/// GET /metrics from `addr`; the body of a `200 OK`. `timeout` bounds the
/// connect and each read.
pub fn scrape(addr: SocketAddr, timeout: Duration) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: splicer\r\nConnection: close\r\n\r\n")?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .with_context(|| format!("scrape: read failed after {} bytes", resp.len()))?;
    let resp = String::from_utf8(resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .with_context(|| format!("scrape: not an HTTP response: {resp:?}"))?;
    ensure!(head.starts_with("HTTP/1.1 200 OK\r\n"), "scrape: {head}");
    Ok(body.to_string())
}
