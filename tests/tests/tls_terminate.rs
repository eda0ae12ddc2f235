//! TLS terminated by splicer (`tls-cert`, issue 14) against the binary:
//! real clients (Node's OpenSSL, mosquitto_pub/sub, MQTT.js) through
//! splicer to real brokers (mosquitto, aedes) and to a test upstream that
//! records the PROXY v2 header, whose TLVs are decoded here from the spec
//! (haproxy doc/proxy-protocol.txt, 2.2.5-2.2.6), not by splicer's code.
use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use splicer_tests::*;

/// The test client's certificate's CN, and the name the server's takes.
const DEVICE: &str = "device-42";
const SERVER: &str = "broker.test";

/// One connection as the test upstream saw it.
struct Seen {
    header: Vec<u8>,
    /// Bytes after the header, until the client's FIN.
    bytes: u64,
}

/// A test upstream on BROKER_IP: reads each connection's PROXY header,
/// then echoes every byte until the client's FIN, and reports both.
fn echo_upstream() -> Result<(SocketAddr, mpsc::Receiver<Seen>)> {
    let (l, addr) = listen_on(BROKER_IP)?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let tx = tx.clone();
            thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                let Ok(header) = read_proxy_header(&mut s) else { return };
                let mut buf = vec![0u8; 64 * 1024];
                let mut bytes = 0;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            bytes += n as u64;
                            if s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.shutdown(Shutdown::Write);
                let _ = tx.send(Seen { header, bytes });
            });
        }
    });
    Ok((addr, rx))
}

/// The TLVs of a PROXY v2 header, as (type, value).
fn tlvs(header: &[u8]) -> Result<Vec<(u8, Vec<u8>)>> {
    ensure!(header.len() >= 16 && header[..12] == *b"\r\n\r\n\0\r\nQUIT\n", "not a v2 header: {}", show(header));
    let addr_len = match header[13] >> 4 {
        1 => 12,
        2 => 36,
        fam => bail!("address family {fam}"),
    };
    split_tlvs(&header[16 + addr_len..])
}

fn split_tlvs(mut rest: &[u8]) -> Result<Vec<(u8, Vec<u8>)>> {
    let mut out = Vec::new();
    while !rest.is_empty() {
        ensure!(rest.len() >= 3, "a truncated TLV");
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        ensure!(rest.len() >= 3 + len, "a TLV longer than the header");
        out.push((rest[0], rest[3..3 + len].to_vec()));
        rest = &rest[3 + len..];
    }
    Ok(out)
}

/// PP2_TYPE_SSL as the spec lays it out.
#[derive(Debug)]
struct SslTlv {
    client: u8,
    verify: u32,
    subs: Vec<(u8, String)>,
}

impl SslTlv {
    fn sub(&self, typ: u8) -> Option<&str> {
        self.subs.iter().find(|(t, _)| *t == typ).map(|(_, v)| v.as_str())
    }
}

fn ssl_tlv(header: &[u8]) -> Result<(SslTlv, Option<String>)> {
    let all = tlvs(header)?;
    let ssl: Vec<_> = all.iter().filter(|(t, _)| *t == 0x20).collect();
    ensure!(ssl.len() == 1, "{} PP2_TYPE_SSL TLVs in {all:?}", ssl.len());
    let v = &ssl[0].1;
    ensure!(v.len() >= 5, "PP2_TYPE_SSL too short");
    let subs = split_tlvs(&v[5..])?
        .into_iter()
        .map(|(t, v)| (t, String::from_utf8_lossy(&v).into_owned()))
        .collect();
    let authority = all.iter().find(|(t, _)| *t == 0x02).map(|(_, v)| String::from_utf8_lossy(v).into_owned());
    Ok((
        SslTlv {
            client: v[0],
            verify: u32::from_be_bytes([v[1], v[2], v[3], v[4]]),
            subs,
        },
        authority,
    ))
}

/// The values of every PP2_TYPE_ALPN in a v2 header.
fn alpn_tlvs(header: &[u8]) -> Result<Vec<Vec<u8>>> {
    Ok(tlvs(header)?.into_iter().filter(|(t, _)| *t == 0x01).map(|(_, v)| v).collect())
}

const SSL_VERSION: u8 = 0x21;
const SSL_CN: u8 = 0x22;
const SSL_CIPHER: u8 = 0x23;
const SSL_SIG_ALG: u8 = 0x24;
const SSL_KEY_ALG: u8 = 0x25;

/// A trusted hop's PROXY v2 header naming `src`:12345 -> 127.0.0.3:1883,
/// with `tlvs`.
fn hop_header(src: [u8; 4], tlvs: &[u8]) -> Vec<u8> {
    v2_header(v4(src.into(), 12345), v4(SPLICER_IP, 1883), tlvs)
}

fn terminating(dir: &Path, pki: &Pki, extra: &[&str]) -> Result<Splicer> {
    with_pairs(dir, &[pki.server(SERVER, 2)?], extra)
}

/// splicer terminating TLS with these (certificate, key) pairs, in order.
fn with_pairs(dir: &Path, pairs: &[(PathBuf, PathBuf)], extra: &[&str]) -> Result<Splicer> {
    let mut args: Vec<&str> = extra.to_vec();
    for (cert, key) in pairs {
        args.extend(["--tls-cert", cert.to_str().context("path")?, "--tls-key", key.to_str().context("path")?]);
    }
    Splicer::start(dir, &args)
}

/// With a client certificate (TLS 1.3) and without one (TLS 1.2), the
/// broker's PROXY v2 header names the real client and carries what
/// HAProxy's `send-proxy-v2-ssl-cn` carries: PP2_TYPE_SSL (client bits,
/// verify, version, CN, cipher, signature and key algorithms),
/// PP2_TYPE_AUTHORITY (the SNI) and PP2_TYPE_ALPN (the protocol agreed).
/// An earlier hop's PP2_TYPE_SSL claiming another CN, its AUTHORITY and its
/// ALPN never get through. 8 MiB echo back byte for byte.
#[test]
fn the_proxy_v2_header_carries_the_client_certificate() -> Result<()> {
    let dir = scratch("tls-term-tlvs");
    let pki = Pki::new(&dir, "ca")?;
    let (ccert, ckey) = pki.client(DEVICE, KeyType::Rsa2048)?;
    let (up, seen) = echo_upstream()?;
    let up = up.to_string();
    let ca = pki.ca.to_str().context("path")?.to_string();
    let splicer = terminating(
        &dir,
        &pki,
        &[
            "--upstream", &up, "--send-proxy", "v2", "--tls-client-ca", &ca, "--tls-client-auth", "optional",
            "--accept-proxy", "auto", "--trusted-proxy", "127.0.0.2/32",
        ],
    )?;
    let payload = dir.join("payload");
    let mut data = vec![0u8; 8 << 20];
    Pattern::new(7).fill(&mut data);
    std::fs::write(&payload, &data)?;
    let out = dir.join("echoed");
    // The client is behind a trusted hop that claims, in its own v2
    // header, a TLS client "admin": that is an earlier hop's TLS, not the
    // one splicer terminated, and must not reach the broker.
    let mut spoof = vec![0x20, 0, 5 + 3 + 5, 0x07, 0, 0, 0, 0, SSL_CN, 0, 5];
    spoof.extend(b"admin");
    spoof.extend([0x02, 0, 4]);
    spoof.extend(b"evil");
    spoof.extend([0x01, 0, 2]);
    spoof.extend(b"h2");
    let before = hop_header([10, 9, 0, 1], &spoof);

    let saw = TlsClient {
        servername: Some(SERVER),
        ca: Some(&pki.ca),
        cert: Some((&ccert, &ckey)),
        alpn: Some("mqtt"),
        send: Some(&payload),
        out: Some(&out),
        before: &before,
        ..Default::default()
    }
    .run(splicer.listen, STEP * 3)?;
    ensure!(saw.cn == SERVER && saw.protocol == "TLSv1.3" && saw.alpn == "mqtt", "{saw:?}");
    ensure!(std::fs::read(&out)? == data, "the 8 MiB echo came back different ({} bytes)", saw.bytes);
    let s = seen.recv_timeout(STEP)?;
    ensure!(s.bytes == data.len() as u64, "the upstream got {} bytes", s.bytes);
    // The hop named 10.9.0.1:12345; the header names it, not the hop.
    ensure!(s.header[16..20] == [10, 9, 0, 1] && s.header[24..26] == 12345u16.to_be_bytes(), "{}", show(&s.header));
    let (ssl, authority) = ssl_tlv(&s.header)?;
    eprintln!("with a certificate: {ssl:?} authority {authority:?}");
    ensure!(ssl.client == 0x07 && ssl.verify == 0, "{ssl:?}");
    ensure!(ssl.sub(SSL_VERSION) == Some("TLSv1.3"), "{ssl:?}");
    ensure!(ssl.sub(SSL_CN) == Some(DEVICE), "{ssl:?}");
    ensure!(ssl.sub(SSL_CIPHER).is_some_and(|c| c.starts_with("TLS_AES_") || c.starts_with("TLS_CHACHA20")), "{ssl:?}");
    // The spec's SIG_ALG and KEY_ALG describe the certificate splicer
    // presented (an EC P-256 key, signed by the EC CA), as HAProxy's do.
    ensure!(ssl.sub(SSL_SIG_ALG) == Some("ecdsa-with-SHA256"), "{ssl:?}");
    ensure!(ssl.sub(SSL_KEY_ALG) == Some("EC256"), "{ssl:?}");
    ensure!(authority.as_deref() == Some(SERVER), "authority {authority:?}");
    // PP2_TYPE_ALPN: the protocol agreed with splicer, not the hop's.
    ensure!(alpn_tlvs(&s.header)? == [b"mqtt".to_vec()], "{}", show(&s.header));
    ensure!(!s.header.windows(5).any(|w| w == b"admin") && !s.header.windows(4).any(|w| w == b"evil"), "{}", show(&s.header));

    // No certificate, TLS 1.2: SSL only, verify non-zero, no CN.
    let before = hop_header([10, 9, 0, 2], &[]);
    let saw = TlsClient {
        servername: Some(SERVER),
        ca: Some(&pki.ca),
        max_version: Some("TLSv1.2"),
        before: &before,
        send: Some(&payload),
        out: Some(&out),
        ..Default::default()
    }
    .run(splicer.listen, STEP * 3)?;
    ensure!(saw.protocol == "TLSv1.2", "{saw:?}");
    ensure!(std::fs::read(&out)? == data, "the TLS 1.2 echo came back different");
    let s = seen.recv_timeout(STEP)?;
    let (ssl, authority) = ssl_tlv(&s.header)?;
    eprintln!("without: {ssl:?} authority {authority:?}");
    ensure!(ssl.client == 0x01 && ssl.verify != 0, "{ssl:?}");
    ensure!(ssl.sub(SSL_VERSION) == Some("TLSv1.2") && ssl.sub(SSL_CN).is_none(), "{ssl:?}");
    ensure!(ssl.sub(SSL_CIPHER).is_some_and(|c| c.starts_with("TLS_ECDHE_ECDSA_WITH_")), "{ssl:?}");
    ensure!(s.header[16..20] == [10, 9, 0, 2], "{}", show(&s.header));
    ensure!(alpn_tlvs(&s.header)?.is_empty(), "no ALPN offered, but: {}", show(&s.header));

    let lines = splicer.wait_closed(2, STEP)?;
    ensure!(close_field(&lines[0], "cn") == Some(&format!("\"{DEVICE}\"")), "{}", lines[0]);
    ensure!(close_field(&lines[0], "tls_version") == Some("TLSv1.3"), "{}", lines[0]);
    ensure!(close_field(&lines[1], "cn") == Some("-"), "{}", lines[1]);
    for l in &lines {
        ensure!(close_num(l, "client_to_upstream")? == data.len() as u64, "{l}");
        ensure!(close_num(l, "upstream_to_client")? == data.len() as u64, "{l}");
        ensure!(close_field(l, "end") == Some("client"), "{l}");
    }
    Ok(())
}

/// A client that writes before it reads (a blocking, single-threaded
/// device stack) while the broker streams at it: its 32 MiB reach the
/// broker although it reads none of the broker's 16 MiB until it is done
/// writing (by then splicer's writes to it have long been blocked); then
/// every byte of both arrives, in order.
#[test]
fn a_client_that_writes_before_it_reads_is_not_stuck_behind_what_it_has_not_read() -> Result<()> {
    let dir = scratch("tls-term-backpressure");
    let pki = Pki::new(&dir, "ca")?;
    let (l, up) = listen_on(BROKER_IP)?;
    let (up_len, down_len) = (32u64 << 20, 16u64 << 20);
    let broker = thread::spawn(move || -> Result<()> {
        let (s, _) = l.accept()?;
        s.set_read_timeout(Some(STEP * 3))?;
        let mut r = s.try_clone()?;
        read_proxy_header(&mut r)?;
        // Streams at the client from the start, whether it reads or not.
        let mut w = s;
        let writer = thread::spawn(move || {
            send_pattern(&mut w, 21, down_len)?;
            w.shutdown(Shutdown::Write)
        });
        expect_pattern(&mut r, 20, up_len)?;
        writer.join().map_err(|_| anyhow::anyhow!("writer"))??;
        Ok(())
    });
    let up = up.to_string();
    let splicer = terminating(&dir, &pki, &["--upstream", &up, "--send-proxy", "v2"])?;
    let mut c = blocking_tls(splicer.listen, client_config(&pki.ca, None, None)?, SERVER)?;
    // Small buffers, and time for the broker's stream to fill them.
    let sock = socket2::SockRef::from(&c.sock);
    sock.set_recv_buffer_size(64 << 10)?;
    sock.set_send_buffer_size(64 << 10)?;
    c.conn.complete_io(&mut c.sock)?;
    thread::sleep(Duration::from_millis(500));
    send_pattern(&mut c, 20, up_len).context("writing before reading: stuck")?;
    c.conn.send_close_notify();
    c.flush()?;
    c.sock.shutdown(Shutdown::Write)?;
    expect_pattern(&mut c, 21, down_len)?;
    broker.join().map_err(|_| anyhow::anyhow!("broker"))??;
    Ok(())
}

/// A second connection resumes the first one's session, in TLS 1.3 and
/// 1.2, without showing the certificate again: its PROXY v2 header says
/// the certificate came in the session, not on this connection
/// (PP2_CLIENT_CERT_SESS without _CONN), with the same CN, verified.
#[test]
fn sessions_resume_and_keep_the_client_certificate() -> Result<()> {
    let dir = scratch("tls-term-resume");
    let pki = Pki::new(&dir, "ca")?;
    let (ccert, ckey) = pki.client(DEVICE, KeyType::EcP256)?;
    let (up, seen) = echo_upstream()?;
    let (up, ca) = (up.to_string(), pki.ca.to_str().context("path")?.to_string());
    let splicer = terminating(&dir, &pki, &["--upstream", &up, "--send-proxy", "v2", "--tls-client-ca", &ca])?;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let config = client_config(&pki.ca, Some((&ccert, &ckey)), Some(version))?;
        for (round, kind, bits) in [(0, rustls::HandshakeKind::Full, 0x07), (1, rustls::HandshakeKind::Resumed, 0x05)] {
            let mut c = blocking_tls(splicer.listen, config.clone(), SERVER)?;
            // A round trip: TLS 1.3 tickets come after the handshake.
            c.write_all(b"ping")?;
            let mut back = [0u8; 4];
            c.read_exact(&mut back)?;
            ensure!(&back == b"ping");
            let got = c.conn.handshake_kind();
            c.conn.send_close_notify();
            c.flush()?;
            drop(c);
            ensure!(got == Some(kind), "{version:?} round {round}: {got:?}");
            let s = seen.recv_timeout(STEP)?;
            let (ssl, _) = ssl_tlv(&s.header)?;
            ensure!(ssl.client == bits && ssl.verify == 0 && ssl.sub(SSL_CN) == Some(DEVICE), "{version:?} round {round}: {ssl:?}");
        }
    }
    Ok(())
}

/// A TLS 1.3 client whose Finished, first data, close_notify and FIN all
/// arrive at once: the handshake completes, the data reaches the broker
/// after the PROXY header, the end of stream follows it, and the broker's
/// answer reaches the client. Clients that finish their handshake and
/// leave at once (as `openssl s_time` and TLS health checks do; the session
/// tickets then meet a reset) count as handshakes done, not failed.
#[test]
fn finished_data_and_close_in_one_segment_are_all_served() -> Result<()> {
    let dir = scratch("tls-term-oneshot");
    let pki = Pki::new(&dir, "ca")?;
    let (up, seen) = echo_upstream()?;
    let up = up.to_string();
    let metrics = metrics_addr();
    let m_arg = metrics.to_string();
    let splicer = terminating(&dir, &pki, &["--upstream", &up, "--send-proxy", "v2", "--metrics", &m_arg])?;
    let mut c = blocking_tls(splicer.listen, client_config(&pki.ca, None, Some(&rustls::version::TLS13))?, SERVER)?;
    let (conn, sock) = (&mut c.conn, &mut c.sock);
    // Until the server's flight is processed: the client's Finished is
    // then queued, not yet sent.
    while conn.is_handshaking() {
        while conn.wants_write() {
            conn.write_tls(sock)?;
        }
        if conn.is_handshaking() {
            conn.read_tls(sock)?;
            conn.process_new_packets()?;
        }
    }
    conn.writer().write_all(b"hello")?;
    conn.send_close_notify();
    let mut all = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut all)?;
    }
    sock.write_all(&all)?;
    sock.shutdown(Shutdown::Write)?;
    let s = seen.recv_timeout(STEP)?;
    ensure!(s.bytes == 5, "the broker got {} bytes", s.bytes);
    let mut back = Vec::new();
    match c.read_to_end(&mut back) {
        Ok(_) => {}
        // A FIN right behind the close_notify is fine too.
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e.into()),
    }
    ensure!(back == b"hello", "the client got {}", show(&back));
    let line = splicer.wait_closed(1, STEP)?.remove(0);
    ensure!(close_num(&line, "client_to_upstream")? == 5 && close_field(&line, "end") == Some("client"), "{line}");
    for _ in 0..20 {
        let mut c = blocking_tls(splicer.listen, client_config(&pki.ca, None, None)?, SERVER)?;
        c.conn.complete_io(&mut c.sock)?;
        ensure!(!c.conn.is_handshaking());
    }
    for _ in 0..20 {
        seen.recv_timeout(STEP).context("a client that left after its handshake reached no upstream")?;
    }
    expect_metrics(metrics, &[("splicer_rejections_total{listener=\"default\",reason=\"bad_tls_handshake\"}", 0.0)])?;
    Ok(())
}

/// A trusted hop's PROXY v2 header and the ClientHello behind it in the
/// same bytes, dripped one at a time: the header is read, the rest goes to
/// the handshake, which completes; the echo comes back and the broker's
/// header names the hop's client.
#[test]
fn a_dripped_proxy_header_and_client_hello_complete_the_handshake() -> Result<()> {
    let dir = scratch("tls-term-drip");
    let pki = Pki::new(&dir, "ca")?;
    let (up, seen) = echo_upstream()?;
    let up = up.to_string();
    let splicer = terminating(
        &dir,
        &pki,
        &["--upstream", &up, "--send-proxy", "v2", "--accept-proxy", "v2", "--trusted-proxy", "127.0.0.2/32"],
    )?;
    let mut c = blocking_tls(splicer.listen, client_config(&pki.ca, None, None)?, SERVER)?;
    let mut first = hop_header([10, 9, 0, 7], &[]);
    while c.conn.wants_write() {
        c.conn.write_tls(&mut first)?;
    }
    c.sock.set_nodelay(true)?;
    for b in &first {
        c.sock.write_all(&[*b])?;
        thread::sleep(Duration::from_millis(1));
    }
    c.write_all(b"dripped")?;
    c.flush()?;
    let mut back = [0u8; 7];
    c.read_exact(&mut back)?;
    ensure!(&back == b"dripped", "echo {}", show(&back));
    drop(c);
    let s = seen.recv_timeout(STEP)?;
    ensure!(s.header[16..20] == [10, 9, 0, 7] && s.bytes == 7, "{} ({} bytes)", show(&s.header), s.bytes);
    Ok(())
}

/// `tls-client-auth = required`: a client without a certificate, and one
/// whose certificate another CA signed, are refused in the handshake,
/// counted by reason, and never reach the upstream; one with a good
/// certificate gets through.
#[test]
fn client_certificates_are_required_and_checked() -> Result<()> {
    let dir = scratch("tls-term-mtls");
    let pki = Pki::new(&dir, "ca")?;
    let other = Pki::new(&dir, "other-ca")?;
    let (good, good_key) = pki.client(DEVICE, KeyType::EcP256)?;
    let (bad, bad_key) = other.client("intruder", KeyType::EcP256)?;
    let broker = TcpListener::bind((BROKER_IP, free_port(BROKER_IP)))?;
    broker.set_nonblocking(true)?;
    let up = broker.local_addr()?.to_string();
    let ca = pki.ca.to_str().context("path")?.to_string();
    let metrics = metrics_addr();
    let m_arg = metrics.to_string();
    let splicer = terminating(&dir, &pki, &["--upstream", &up, "--tls-client-ca", &ca, "--metrics", &m_arg])?;
    let client = TlsClient {
        servername: Some(SERVER),
        ca: Some(&pki.ca),
        ..Default::default()
    };
    let no_cert = client.run(splicer.listen, STEP);
    ensure!(no_cert.is_err(), "a client without a certificate got through: {no_cert:?}");
    let wrong_ca = TlsClient { cert: Some((&bad, &bad_key)), ..client.clone() }.run(splicer.listen, STEP);
    ensure!(wrong_ca.is_err(), "a client of another CA got through: {wrong_ca:?}");
    match broker.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => bail!("a refused client reached the upstream: {other:?}"),
    }
    broker.set_nonblocking(false)?;
    let t = thread::spawn(move || -> Result<Vec<u8>> {
        let (mut s, _) = broker.accept()?;
        let h = read_proxy_header(&mut s).ok().unwrap_or_default();
        s.shutdown(Shutdown::Write)?;
        Ok(h)
    });
    TlsClient { cert: Some((&good, &good_key)), ..client }.run(splicer.listen, STEP)?;
    t.join().map_err(|_| anyhow::anyhow!("upstream thread"))??;
    let by_reason = |r: &str| format!("splicer_tls_handshake_failures_total{{listener=\"default\",reason=\"{r}\"}}");
    let series = [
        ("splicer_rejections_total{listener=\"default\",reason=\"bad_tls_handshake\"}".to_string(), 2.0),
        (by_reason("no_client_cert"), 1.0),
        (by_reason("bad_client_cert"), 1.0),
    ];
    let refs: Vec<(&str, f64)> = series.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    let text = expect_metrics(metrics, &refs)?;
    // The served certificate's expiry is exported: two days from now.
    let not_after = text
        .lines()
        .find(|l| l.starts_with("splicer_tls_cert_not_after_seconds{") && l.contains(SERVER))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .context("no splicer_tls_cert_not_after_seconds for the certificate")?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    ensure!((not_after - now - 2.0 * 86400.0).abs() < 600.0, "not_after {not_after}, now {now}");
    // The first refusal is logged; the next within the second is counted
    // into the following line (scanners fail handshakes by the thousand).
    let lines = wait_lines(&splicer.proc, "refused: TLS handshake failed", 1)?;
    ensure!(lines[0].contains("no certificates"), "{lines:?}");
    Ok(())
}

/// Two certificates: each client gets the one that names its server name;
/// a name neither names, and no name, get the first. Checked from the
/// client side (the CN it was shown, verified against the CA). ALPN: a
/// client offering `mqtt` agrees on it, one offering only `h2` is refused.
#[test]
fn the_server_name_picks_the_certificate() -> Result<()> {
    let dir = scratch("tls-term-sni");
    let pki = Pki::new(&dir, "ca")?;
    let (up, _seen) = echo_upstream()?;
    let up = up.to_string();
    let splicer = with_pairs(&dir, &[pki.server("a.test", 2)?, pki.server("b.test", 2)?], &["--upstream", &up])?;
    for (name, want, verify) in [(Some("a.test"), "a.test", true), (Some("b.test"), "b.test", true), (Some("c.test"), "a.test", false), (None, "a.test", false)] {
        let saw = TlsClient {
            servername: name,
            ca: verify.then_some(pki.ca.as_path()),
            ..Default::default()
        }
        .run(splicer.listen, STEP)?;
        ensure!(saw.cn == want, "{name:?}: shown {:?}, want {want}", saw.cn);
    }
    let alpn = |offer| TlsClient { servername: Some("a.test"), ca: Some(&pki.ca), alpn: Some(offer), ..Default::default() };
    ensure!(alpn("h2,mqtt").run(splicer.listen, STEP)?.alpn == "mqtt");
    let refused = alpn("h2").run(splicer.listen, STEP);
    ensure!(refused.as_ref().is_err_and(|e| e.to_string().contains("no application protocol")), "{refused:?}");
    Ok(())
}

/// An RSA and an ECDSA certificate for one name, RSA first (nginx's two
/// `ssl_certificate` lines): a client that can verify only ECDSA gets the
/// ECDSA one, one that can verify only RSA the RSA one, one that can verify
/// both the first. The PROXY v2 header's SSL_KEY_ALG names the one served.
/// A name neither names, or none, still gets one the client can verify.
#[test]
fn each_client_gets_a_certificate_it_can_verify() -> Result<()> {
    let dir = scratch("tls-term-keys");
    let pki = Pki::new(&dir, "ca")?;
    let (up, seen) = echo_upstream()?;
    let up = up.to_string();
    let pairs = [pki.server_with(SERVER, 2, KeyType::Rsa2048)?, pki.server_with(SERVER, 2, KeyType::EcP256)?];
    let splicer = with_pairs(&dir, &pairs, &["--upstream", &up, "--send-proxy", "v2"])?;
    const EC_ONLY: &str = "ecdsa_secp256r1_sha256";
    const RSA_ONLY: &str = "rsa_pss_rsae_sha256:rsa_pkcs1_sha256";
    for (name, sigalgs, key, key_alg) in [
        (Some(SERVER), Some(EC_ONLY), "EC", "EC256"),
        (Some(SERVER), Some(RSA_ONLY), "RSA", "RSA2048"),
        (Some(SERVER), None, "RSA", "RSA2048"),
        (Some("other.test"), Some(EC_ONLY), "EC", "EC256"),
        (None, Some(EC_ONLY), "EC", "EC256"),
    ] {
        let saw = TlsClient {
            servername: name,
            ca: (name == Some(SERVER)).then_some(pki.ca.as_path()),
            sigalgs,
            ..Default::default()
        }
        .run(splicer.listen, STEP)
        .with_context(|| format!("{name:?} offering {sigalgs:?}"))?;
        ensure!(saw.key == key, "{name:?} offering {sigalgs:?}: shown a {} certificate, want {key}", saw.key);
        let (ssl, _) = ssl_tlv(&seen.recv_timeout(STEP)?.header)?;
        ensure!(ssl.sub(SSL_KEY_ALG) == Some(key_alg), "{name:?} offering {sigalgs:?}: {ssl:?}");
    }
    Ok(())
}

/// MQTT over TLS, the way devices connect: mosquitto_pub/sub with
/// --cafile (and --cert/--key) and MQTT.js over mqtts:// through a
/// `protocol = "mqtt"` listener to mosquitto; MQTT.js to aedes, which
/// reads the PROXY v2 header and reports the real client.
#[test]
fn mqtt_over_tls_reaches_mosquitto_and_aedes() -> Result<()> {
    let dir = scratch("tls-term-mqtt");
    let pki = Pki::new(&dir, "ca")?;
    let (ccert, ckey) = pki.client(DEVICE, KeyType::EcP256)?;
    let broker_addr = v4(BROKER_IP, free_port(BROKER_IP));
    let conf = format!(
        "listener {} {}\nallow_anonymous true\npersistence false\nlog_dest stderr\nlog_type all\n",
        broker_addr.port(),
        broker_addr.ip()
    );
    let mut broker = match spawn_mosquitto(&dir, &conf, broker_addr)? {
        Ok(b) => b,
        Err((st, out)) => bail!("mosquitto exited ({st}):\n{out}"),
    };
    let up = broker_addr.to_string();
    let ca = pki.ca.to_str().context("path")?.to_string();
    let splicer = terminating(&dir, &pki, &["--upstream", &up, "--protocol", "mqtt", "--tls-client-ca", &ca])?;
    let (host, port) = (SERVER, splicer.listen.port().to_string());
    // mosquitto's clients resolve the host; broker.test names the
    // certificate, so connect by address and check the name given.
    let tls: Vec<String> = ["--cafile", &ca, "--cert", ccert.to_str().context("path")?, "--key", ckey.to_str().context("path")?]
        .map(str::to_string)
        .to_vec();
    let at = ["-h", &SPLICER_IP.to_string(), "-p", &port, "-A", &CLIENT_IP.to_string(), "--tls-alpn", "mqtt"].map(str::to_string);
    let mut sub = Proc::spawn_apart(
        "sub",
        &dir,
        Command::new("mosquitto_sub")
            .args(&at)
            .args(&tls)
            .args(["--insecure", "-i", "tls-sub", "-q", "1", "-t", "tls/t", "-C", "3"]),
    )?;
    broker
        .wait_line("Sending SUBACK to tls-sub", STEP)
        .with_context(|| format!("subscriber: {}", sub.stderr()))?;
    for i in 1..=3 {
        let (st, out, err) = run_with_timeout(
            Command::new("mosquitto_pub")
                .args(&at)
                .args(&tls)
                .args(["--insecure", "-q", "1", "-t", "tls/t", "-m", &format!("secret-{i}")]),
            STEP,
        )?;
        ensure!(st.success(), "mosquitto_pub: {st}\n{out}{err}");
    }
    ensure!(sub.wait_exit(STEP)?.success(), "subscriber: {}", sub.stderr());
    ensure!(sub.output() == "secret-1\nsecret-2\nsecret-3\n", "subscriber got {:?}", sub.output());
    // Without a certificate, mosquitto_pub is refused.
    let (st, ..) = run_with_timeout(
        Command::new("mosquitto_pub").args(&at).args(["--cafile", &ca, "--insecure", "-t", "x", "-m", "x"]),
        STEP,
    )?;
    ensure!(!st.success(), "mosquitto_pub without a certificate got through");
    // MQTT.js, checking the server's certificate by name.
    let url = format!("mqtts://{}:{port}", SPLICER_IP);
    let out = run_mqtt_client(
        &url,
        "mqttjs-tls",
        &["--ca", &ca, "--cert", ccert.to_str().context("path")?, "--key", ckey.to_str().context("path")?, "--servername", host, "--bind-host", &CLIENT_IP.to_string(), "--subscribe", "js/t", "--publish", "js/t", "hi"],
        STEP,
    )?;
    ensure!(out.contains("\"payload\":\"hi\"") && out.contains(&format!("\"serverCN\":\"{SERVER}\"")), "{out}");
    let lines = splicer.wait_closed(5, STEP)?;
    let js = lines.iter().find(|l| l.contains("mqttjs-tls")).context("no close line for MQTT.js")?;
    ensure!(close_field(js, "cn") == Some(&format!("\"{DEVICE}\"")) && close_field(js, "sni") == Some(SERVER), "{js}");

    // aedes behind a PROXY header: it reports the real client. v1: its
    // decoder (proxy-protocol-js) takes whatever follows a v2 header's
    // addresses for MQTT, TLVs included, so the TLS TLVs break it.
    let (mut aedes, aedes_addr) = start_aedes(&dir)?;
    let up = aedes_addr.to_string();
    let dir2 = subdir(&dir, "aedes")?;
    let splicer = terminating(&dir2, &pki, &["--upstream", &up, "--protocol", "mqtt", "--send-proxy", "v1"])?;
    let url = format!("mqtts://{}:{}", SPLICER_IP, splicer.listen.port());
    run_mqtt_client(&url, "aedes-tls", &["--ca", &ca, "--servername", SERVER, "--bind-host", &CLIENT_IP.to_string(), "--publish", "a/t", "x"], STEP)?;
    let seen = aedes_client(&mut aedes, "aedes-tls")?;
    ensure!(json_field(&seen, "ip") == Some(CLIENT_IP.to_string()) && json_field(&seen, "isProxy").as_deref() == Some("1"), "aedes saw {seen}");
    Ok(())
}

/// WebSocket over TLS: MQTT.js over wss:// through a `ws` listener to
/// aedes' WebSocket listener, which reads X-Forwarded-For and reports the
/// real client; and through `mqtt-ws` to mosquitto's websockets listener,
/// with the CONNECT read after the handshake (the close line names it).
#[test]
fn mqtt_over_wss_reaches_aedes_and_mosquitto() -> Result<()> {
    let dir = scratch("tls-term-wss");
    let pki = Pki::new(&dir, "ca")?;
    let ca = pki.ca.to_str().context("path")?.to_string();
    let (mut aedes, aedes_ws) = start_aedes_ws(&dir)?;
    let up = aedes_ws.to_string();
    let splicer = terminating(&dir, &pki, &["--upstream", &up, "--protocol", "ws", "--set-real-ip-header", "X-Real-IP"])?;
    let url = format!("wss://{}:{}/mqtt", SPLICER_IP, splicer.listen.port());
    let out = run_mqtt_client(&url, "wss-aedes", &["--ca", &ca, "--servername", SERVER, "--bind-host", &CLIENT_IP.to_string(), "--subscribe", "w/t", "--publish", "w/t", "over wss"], STEP)?;
    ensure!(out.contains("\"payload\":\"over wss\""), "{out}");
    let seen = aedes_client(&mut aedes, "wss-aedes")?;
    ensure!(json_field(&seen, "ip") == Some(CLIENT_IP.to_string()), "aedes saw {seen}");

    let mosq = match start_mosquitto_ws(&subdir(&dir, "mosq")?)? {
        Ok(m) => m,
        Err(why) => {
            eprintln!("skipping the mosquitto half: {why}");
            return Ok(());
        }
    };
    let (_mosq, mosq_ws) = mosq;
    let up = mosq_ws.to_string();
    let dir2 = subdir(&dir, "mqtt-ws")?;
    let splicer = terminating(&dir2, &pki, &["--upstream", &up, "--protocol", "mqtt-ws"])?;
    let url = format!("wss://{}:{}/mqtt", SPLICER_IP, splicer.listen.port());
    let out = run_mqtt_client(&url, "wss-mosq", &["--ca", &ca, "--servername", SERVER, "--bind-host", &CLIENT_IP.to_string(), "--mqtt-version", "5", "--subscribe", "m/t", "--publish", "m/t", "mqtt-ws over tls"], STEP)?;
    ensure!(out.contains("\"payload\":\"mqtt-ws over tls\""), "{out}");
    let line = splicer.wait_closed(1, STEP)?.remove(0);
    ensure!(close_field(&line, "client_id") == Some("\"wss-mosq\"") && close_field(&line, "tls_version") == Some("TLSv1.3"), "{line}");
    Ok(())
}

/// A second splicer's (or broker's) folder inside a test's.
fn subdir(dir: &Path, name: &str) -> Result<PathBuf> {
    let d = dir.join(name);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Garbage, a ClientHello cut short by a FIN, one half sent and then
/// silence, and a whole one after which the client half-closes: each
/// refused, counted by reason, nothing reaching the upstream, and the
/// waiting costs no CPU.
#[test]
fn bad_handshakes_are_refused_counted_and_cost_no_cpu() -> Result<()> {
    let dir = scratch("tls-term-bad");
    let pki = Pki::new(&dir, "ca")?;
    let hello = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/tls_hello/seed-broker.example"))?;
    let broker = TcpListener::bind((BROKER_IP, free_port(BROKER_IP)))?;
    broker.set_nonblocking(true)?;
    let up = broker.local_addr()?.to_string();
    let metrics = metrics_addr();
    let m_arg = metrics.to_string();
    let splicer = terminating(&dir, &pki, &["--upstream", &up, "--tls-handshake-timeout", "1s", "--metrics", &m_arg])?;
    let cases: [(&str, &[u8]); 3] = [
        ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("cut short, then FIN", &hello[..hello.len() / 2]),
        ("whole, then FIN", &hello),
    ];
    for (what, sent) in cases {
        let mut c = connect_from(CLIENT_IP, splicer.listen)?;
        c.write_all(sent)?;
        c.shutdown(Shutdown::Write)?;
        let got = read_to_end_timeout(&mut c, STEP)?;
        // An alert, or (for the whole hello) the server's first flight and
        // nothing more: never a plaintext byte from upstream.
        ensure!(got.first().is_none_or(|b| *b == 0x15 || *b == 0x16), "{what}: the client got {}", show(&got));
    }
    let cpu_before = splicer.proc.cpu_seconds();
    let t0 = Instant::now();
    let mut drip = connect_from(CLIENT_IP, splicer.listen)?;
    for b in &hello[..hello.len() / 2] {
        drip.write_all(&[*b])?;
    }
    let got = read_to_end_timeout(&mut drip, STEP)?;
    let after = t0.elapsed();
    ensure!(got.is_empty(), "a stalled client got {}", show(&got));
    ensure!((Duration::from_millis(900)..Duration::from_secs(3)).contains(&after), "a stalled handshake cut after {after:?}");
    thread::sleep(Duration::from_millis(300));
    let cpu = splicer.proc.cpu_seconds() - cpu_before;
    ensure!(cpu < 0.3, "splicer used {cpu:.2} CPU-seconds on a stalled handshake");
    match broker.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => bail!("a refused client reached the upstream: {other:?}"),
    }
    let by_reason = |r: &str| format!("splicer_tls_handshake_failures_total{{listener=\"default\",reason=\"{r}\"}}");
    let series = [
        ("splicer_rejections_total{listener=\"default\",reason=\"bad_tls_handshake\"}".to_string(), 4.0),
        (by_reason("malformed"), 1.0),
        (by_reason("closed"), 2.0),
        (by_reason("timeout"), 1.0),
    ];
    let refs: Vec<(&str, f64)> = series.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    expect_metrics(metrics, &refs)?;
    Ok(())
}

/// SIGHUP with the certificate file replaced: new handshakes get the new
/// certificate (and its expiry shows in the metric), while a connection
/// in the middle of an 8 MiB echo across the reload finishes exactly. A
/// certificate file that does not load refuses the reload: the one before
/// is still served.
#[test]
fn a_reload_swaps_the_certificate_and_live_connections_keep_running() -> Result<()> {
    let dir = scratch("tls-term-reload");
    let pki = Pki::new(&dir, "ca")?;
    let (old_cert, old_key) = pki.server(SERVER, 2)?;
    let (new_cert, new_key) = pki.server(SERVER, 5)?;
    let (cert, key) = (dir.join("live.crt"), dir.join("live.key"));
    std::fs::copy(&old_cert, &cert)?;
    std::fs::copy(&old_key, &key)?;
    let (up, seen) = echo_upstream()?;
    let metrics = metrics_addr();
    let listen = v4(SPLICER_IP, free_port(SPLICER_IP));
    let conf = dir.join("splicer.toml");
    std::fs::write(
        &conf,
        format!(
            "metrics = \"{metrics}\"\n[[listener]]\nlisten = \"{listen}\"\nupstream = [\"{up}\"]\nsend-proxy = \"v2\"\n\
             tls-cert = \"{}\"\ntls-key = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    )?;
    let mut cmd = Command::new(splicer_bin());
    cmd.arg("--config").arg(&conf);
    let splicer = Splicer::start_cmd(&dir, cmd, listen)?;
    let not_after = || -> Result<f64> {
        let text = expect_metrics(metrics, &[])?;
        text.lines()
            .find(|l| l.starts_with("splicer_tls_cert_not_after_seconds{"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .context("no splicer_tls_cert_not_after_seconds")
    };
    let before = not_after()?;
    let payload = dir.join("payload");
    let mut data = vec![0u8; 8 << 20];
    Pattern::new(11).fill(&mut data);
    std::fs::write(&payload, &data)?;
    let out = dir.join("echoed");
    let ca = pki.ca.clone();
    let (p2, o2) = (payload.clone(), out.clone());
    // Half the payload, two seconds' pause (the reload happens in it), the rest.
    let live = thread::spawn(move || {
        TlsClient {
            servername: Some(SERVER),
            ca: Some(&ca),
            send: Some(&p2),
            out: Some(&o2),
            hold: Duration::from_secs(2),
            ..Default::default()
        }
        .run(listen, STEP * 3)
    });
    thread::sleep(Duration::from_millis(700));
    std::fs::copy(&new_cert, &cert)?;
    std::fs::copy(&new_key, &key)?;
    let st = Command::new("kill").args(["-HUP", &splicer.proc.pid().to_string()]).status()?;
    ensure!(st.success());
    wait_lines(&splicer.proc, "reloaded", 1)?;
    let after = not_after()?;
    ensure!((after - before - 3.0 * 86400.0).abs() < 600.0, "not_after {before} -> {after}");
    // The new certificate names the same server: told from the old by
    // the notAfter openssl s_client is shown.
    let shown = shown_not_after(listen)?;
    let want = cert_not_after(&new_cert)?;
    ensure!(shown == want, "after the reload a new client was shown a certificate valid until {shown}, want {want}");
    let saw = live.join().map_err(|_| anyhow::anyhow!("client thread"))??;
    ensure!(saw.bytes == data.len() as u64 && std::fs::read(&out)? == data, "the live connection's echo differs ({} bytes)", saw.bytes);
    std::fs::write(&cert, "not a certificate")?;
    let st = Command::new("kill").args(["-HUP", &splicer.proc.pid().to_string()]).status()?;
    ensure!(st.success());
    wait_lines(&splicer.proc, "reload refused", 1)?;
    let shown = shown_not_after(listen)?;
    ensure!(shown == want, "after a failed reload a client was shown a certificate valid until {shown}, want {want}");
    // Three upstream connections: the live one, and s_client's two.
    let upstream_got: Vec<u64> = (0..3).map(|_| seen.recv_timeout(STEP).map(|s| s.bytes)).collect::<Result<_, _>>()?;
    ensure!(upstream_got.contains(&(data.len() as u64)), "the upstream got {upstream_got:?}");
    Ok(())
}

/// The notAfter of the certificate a server at `addr` shows (openssl
/// s_client, then openssl x509).
fn shown_not_after(addr: SocketAddr) -> Result<String> {
    let (_, out, _) = run_with_timeout(
        Command::new("sh").arg("-c").arg(format!(
            "openssl s_client -connect {addr} -servername {SERVER} </dev/null 2>/dev/null | openssl x509 -noout -enddate"
        )),
        STEP,
    )?;
    Ok(out.trim().to_string())
}

fn cert_not_after(cert: &Path) -> Result<String> {
    let (_, out, _) = run_with_timeout(Command::new("openssl").args(["x509", "-noout", "-enddate", "-in"]).arg(cert), STEP)?;
    Ok(out.trim().to_string())
}
