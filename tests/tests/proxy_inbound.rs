//! Accepting PROXY headers from a trusted peer, byte by byte: headers split
//! across segments or sharing one with the payload, and every kind of bad
//! header refused, counted, and leaving splicer healthy. The test client
//! plays the trusted outer load balancer (127.0.0.2).
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use splicer_tests::*;

const CONNECT: &[u8] = b"\x10\x11\x00\x04MQTT\x04\x02\x00\x3c\x00\x05hello";

fn start(dir: &std::path::Path, mode: &str, upstream: SocketAddr) -> Result<Splicer> {
    splicer_in_mode(
        dir,
        mode,
        upstream,
        &[
            "--accept-proxy",
            "auto",
            "--trusted-proxy",
            "127.0.0.2/32",
            "--send-proxy",
            "v1",
            "--proxy-timeout",
            "500ms",
        ],
    )
}

/// Accepts one connection; returns the PROXY header and the rest.
fn sink(listener: &TcpListener) -> Result<(Vec<u8>, Vec<u8>)> {
    let (mut s, _) = listener.accept()?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let header = read_proxy_header(&mut s)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    Ok((header, rest))
}

/// Sends `pieces` with pauses between them, then `payload`, then FIN.
fn send_in_pieces(to: SocketAddr, pieces: &[&[u8]], payload: &[u8]) -> Result<TcpStream> {
    let mut c = connect_from_client(to)?;
    c.set_nodelay(true)?;
    for p in pieces {
        c.write_all(p)?;
        thread::sleep(Duration::from_millis(60));
    }
    c.write_all(payload)?;
    c.shutdown(Shutdown::Write)?;
    Ok(c)
}

/// What splicer's re-emitted v1 header should say for this client.
fn reemitted(client: SocketAddr, splicer: SocketAddr) -> Vec<u8> {
    expected_v1(client, splicer)
}

#[test]
fn headers_split_or_sharing_a_segment_lose_nothing() -> Result<()> {
    for mode in MODES {
        let dir = scratch(&format!("inbound-ok-{mode}"));
        let (listener, up) = listen_on(BROKER_IP)?;
        let s = start(&dir, mode, up)?;
        let claimed: SocketAddr = "10.1.2.3:4444".parse()?;
        let v1 = format!("PROXY TCP4 10.1.2.3 10.0.0.1 4444 1883\r\n");
        let mut big = vec![0u8; 1 << 20];
        Pattern::new(5).fill(&mut big);
        let v2 = expected_v2(claimed, "10.0.0.1:1883".parse()?);
        let cases: Vec<(&str, Vec<&[u8]>, &[u8])> = vec![
            (
                "v1 split in three",
                vec![
                    &v1.as_bytes()[..3],
                    &v1.as_bytes()[3..20],
                    &v1.as_bytes()[20..],
                ],
                CONNECT,
            ),
            ("v1 with CONNECT in one write", vec![], CONNECT),
            (
                "v2 split at the length field",
                vec![&v2[..14], &v2[14..]],
                CONNECT,
            ),
            ("v1 then 1 MiB at once", vec![], &big),
        ];
        for (what, pieces, payload) in cases {
            let whole: Vec<u8>;
            let (pieces, payload): (Vec<&[u8]>, Vec<u8>) = if pieces.is_empty() {
                whole = [v1.as_bytes(), payload].concat();
                (vec![], whole.clone())
            } else {
                (pieces, payload.to_vec())
            };
            let t = thread::scope(|sc| -> Result<()> {
                let got = sc.spawn(|| sink(&listener));
                let c = send_in_pieces(s.listen, &pieces, &payload)?;
                let (header, rest) = got.join().unwrap()?;
                ensure!(
                    header == reemitted(claimed, s.listen),
                    "{mode} {what}: header {:?}",
                    String::from_utf8_lossy(&header)
                );
                let want: &[u8] = if pieces.is_empty() {
                    &payload[v1.len()..]
                } else {
                    &payload
                };
                ensure!(
                    rest == want,
                    "{mode} {what}: {} bytes after the header, want {}",
                    rest.len(),
                    want.len()
                );
                drop(c);
                Ok(())
            });
            t?;
        }
        let lines = s.wait_closed(4, Duration::from_secs(5))?;
        ensure!(
            lines
                .iter()
                .all(|l| l.contains("client=10.1.2.3:4444 via=127.0.0.2:")),
            "{lines:?}"
        );
    }
    Ok(())
}

/// Sends `bytes` (then waits), and expects splicer to close without
/// connecting upstream with any of it.
fn expect_refused(s: &Splicer, listener: &TcpListener, bytes: &[u8], why: &str) -> Result<()> {
    let before = s.proc.lines_with("rejected:").len();
    let mut c = connect_from_client(s.listen)?;
    c.write_all(bytes)?;
    let t = Instant::now();
    let got = read_to_end_timeout(&mut c, Duration::from_secs(5)).unwrap_or_default();
    ensure!(got.is_empty(), "{why}: client got {got:?}");
    ensure!(
        t.elapsed() < Duration::from_secs(3),
        "{why}: close took {:?}",
        t.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    while s.proc.lines_with("rejected:").len() == before && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let lines = s.proc.lines_with("rejected:");
    ensure!(lines.len() == before + 1, "{why}: no rejection logged");
    ensure!(
        lines.last().unwrap().contains(why),
        "{why}: logged {}",
        lines.last().unwrap()
    );
    ensure!(
        lines.last().unwrap().contains("127.0.0.2:"),
        "rejection does not name the peer"
    );
    listener.set_nonblocking(true)?;
    ensure!(
        listener.accept().is_err(),
        "{why}: splicer connected upstream anyway"
    );
    listener.set_nonblocking(false)?;
    Ok(())
}

#[test]
fn bad_headers_are_refused_counted_and_harmless() -> Result<()> {
    let dir = scratch("inbound-bad");
    let (listener, up) = listen_on(BROKER_IP)?;
    let s = start(&dir, "sockmap", up)?;
    expect_refused(&s, &listener, CONNECT, "no PROXY header")?;
    expect_refused(&s, &listener, b"PROXY GARBAGE\r\n", "invalid PROXY header")?;
    let long = format!("PROXY TCP4 {} 10.0.0.1 1 2\r\n", "1".repeat(190));
    expect_refused(&s, &listener, long.as_bytes(), "too long")?;
    expect_refused(&s, &listener, b"PROXY TCP4 10.1.", "not complete in time")?;
    expect_refused(
        &s,
        &listener,
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\x0a\x00",
        "not complete in time",
    )?;
    // Still healthy: a good connection goes through.
    thread::scope(|sc| -> Result<()> {
        let got = sc.spawn(|| sink(&listener));
        let _c = send_in_pieces(
            s.listen,
            &[],
            &[
                b"PROXY TCP4 10.7.7.7 10.0.0.1 7 1883\r\n".as_slice(),
                CONNECT,
            ]
            .concat(),
        )?;
        let (header, rest) = got.join().unwrap()?;
        ensure!(header == reemitted("10.7.7.7:7".parse()?, s.listen));
        ensure!(rest == CONNECT);
        Ok(())
    })?;
    let mut s = s;
    s.proc.stop();
    let summary = s.proc.lines_with("stopping:").join("");
    ensure!(summary.contains("proxy_rejected=5"), "counters: {summary}");
    Ok(())
}

#[test]
fn local_and_unknown_headers_use_the_peer_address() -> Result<()> {
    let dir = scratch("inbound-local");
    let (listener, up) = listen_on(BROKER_IP)?;
    let s = start(&dir, "sockmap", up)?;
    // v2 LOCAL that carries an IPv4 address block: the block is ignored.
    let mut local = b"\r\n\r\n\0\r\nQUIT\n\x20\x11\x00\x0c".to_vec();
    local.extend([1, 2, 3, 4, 10, 0, 0, 1, 0, 9, 7, 91]);
    for header in [
        local,
        b"PROXY UNKNOWN\r\n".to_vec(),
        b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
    ] {
        thread::scope(|sc| -> Result<()> {
            let got = sc.spawn(|| sink(&listener));
            let c = send_in_pieces(s.listen, &[], &[header.as_slice(), CONNECT].concat())?;
            let me = c.local_addr()?;
            let (h, rest) = got.join().unwrap()?;
            ensure!(
                h == reemitted(me, s.listen),
                "header {:?}",
                String::from_utf8_lossy(&h)
            );
            ensure!(rest == CONNECT);
            Ok(())
        })?;
    }
    Ok(())
}
