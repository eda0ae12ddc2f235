//! HTTP/1.1 as the WebSocket tests see it: upgrade requests written out
//! byte for byte (those bytes are what the tests compare), heads read off
//! a socket, header values, a server's `101`, and refusals read to the end.
use std::{
    io::{ErrorKind, Read},
    net::{SocketAddr, TcpStream},
};

use anyhow::{bail, ensure, Context as _, Result};
use splicer_testkit::ws;

use crate::show;

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A WebSocket upgrade request as MQTT.js sends it, with `extra` header
/// lines (without CRLF) in the middle, so removed or moved ones show.
pub fn upgrade_request(host: SocketAddr, path: &str, key: &str, extra: &[&str]) -> Vec<u8> {
    let mut lines = vec![
        format!("GET {path} HTTP/1.1"),
        format!("Host: {host}"),
        "Upgrade: websocket".into(),
        "Connection: Upgrade".into(),
    ];
    lines.extend(extra.iter().map(|l| l.to_string()));
    lines.extend([
        format!("Sec-WebSocket-Key: {key}"),
        "Sec-WebSocket-Version: 13".into(),
        "Sec-WebSocket-Protocol: mqtt".into(),
        "x-SPLICER-test:  keep   THIS,as-is ;q=1".into(),
        "User-Agent: splicer-e2e/1.0".into(),
    ]);
    (lines.join("\r\n") + "\r\n\r\n").into_bytes()
}

/// Reads an HTTP head through its blank line. Returns the head and any
/// bytes read past it (a server may send frames right behind the 101).
pub fn read_head(s: &mut TcpStream) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(i) = find(&got, b"\r\n\r\n") {
            let rest = got.split_off(i + 4);
            return Ok((got, rest));
        }
        ensure!(got.len() < 64 * 1024, "no end of head in 64 KiB");
        let n = s
            .read(&mut buf)
            .with_context(|| format!("reading a head, got so far: {}", show(&got)))?;
        ensure!(n > 0, "EOF inside a head, got: {}", show(&got));
        got.extend_from_slice(&buf[..n]);
    }
}

/// The header lines of a head (no request line, no CRLFs).
pub fn header_lines(head: &[u8]) -> Vec<&[u8]> {
    let body = head.strip_suffix(b"\r\n\r\n").unwrap_or(head);
    let mut lines: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
    for l in &mut lines {
        *l = l.strip_suffix(b"\r").unwrap_or(l);
    }
    lines.remove(0);
    lines
}

pub fn first_line(head: &[u8]) -> String {
    String::from_utf8_lossy(head.split(|&b| b == b'\r').next().unwrap_or(b"")).into_owned()
}

pub fn line_name(line: &[u8]) -> String {
    let name = line.split(|&b| b == b':').next().unwrap_or(b"");
    String::from_utf8_lossy(name).trim().to_ascii_lowercase()
}

/// The values of every `name` header, trimmed, in order.
pub fn header_values(head: &[u8], name: &str) -> Vec<String> {
    header_lines(head)
        .into_iter()
        .filter(|l| line_name(l) == name.to_ascii_lowercase())
        .map(|l| {
            let v = &l[l.iter().position(|&b| b == b':').unwrap() + 1..];
            String::from_utf8_lossy(v).trim().to_string()
        })
        .collect()
}


/// A WebSocket server's `101` for the request `head`.
pub fn switching(head: &[u8]) -> Vec<u8> {
    let key = header_values(head, "Sec-WebSocket-Key").pop().unwrap_or_default();
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        ws::accept(&key)
    )
    .into_bytes()
}


/// Reads a refusal to the end: the response, then EOF or a reset (splicer
/// closes with the unread request still queued). Returns (status line,
/// "EOF"|"RST"). The response must be complete.
pub fn read_refusal(c: &mut TcpStream) -> Result<(String, &'static str)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        match c.read(&mut buf) {
            Ok(0) => break "EOF",
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break "RST",
            Err(e) => bail!("the connection was not closed ({e}); got {}", show(&got)),
        }
    };
    let i = find(&got, b"\r\n\r\n")
        .with_context(|| format!("incomplete HTTP response: {}", show(&got)))?;
    let (head, body) = (&got[..i + 4], &got[i + 4..]);
    if let Some(len) = header_values(head, "Content-Length").first() {
        ensure!(
            len.parse::<usize>().ok() == Some(body.len()),
            "Content-Length {len} but a {}-byte body: {}",
            body.len(),
            show(&got)
        );
    }
    Ok((first_line(head), end))
}
