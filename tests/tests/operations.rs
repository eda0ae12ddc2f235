//! Running splicer in production (issue 6): Prometheus metrics with exact
//! counts, allow/deny on the real client address (TCP, PROXY header and
//! WebSocket X-Forwarded-For), max-conns, SIGHUP reload under load, and
//! the SIGTERM drain.
//!
//! Addresses: 127.0.0.2 client, 127.0.0.3 splicer (and its metrics port),
//! 127.0.0.4 sinks and brokers, 127.0.0.9 a trusted load balancer,
//! 127.0.0.7 and 127.0.1.2 clients that access control turns away.
use std::{
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use splicer_tests::*;

const LB_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 9);
const DENIED_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 7);
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 2);

// ---------------------------------------------------------------- helpers

fn write_config(dir: &Path, text: &str) -> Result<PathBuf> {
    let path = dir.join("splicer.toml");
    fs::write(&path, text)?;
    Ok(path)
}

/// splicer with `--config` (and extra flags), once `listen` is served.
fn start_config(dir: &Path, config: &Path, listen: SocketAddr, extra: &[&str]) -> Result<Splicer> {
    let mut cmd = Command::new(splicer_bin());
    cmd.arg("--config").arg(config).args(extra);
    Splicer::start_cmd(dir, cmd, listen)
}

fn sink() -> Result<(TcpListener, SocketAddr)> {
    let port = free_port(BROKER_IP);
    let l = TcpListener::bind(v4(BROKER_IP, port))?;
    Ok((l, v4(BROKER_IP, port)))
}

// ---------------------------------------------------------------- metrics

/// Three spoofed PROXY headers, one malformed, one good connection
/// carrying 3 MiB up and 1 MiB down: the scrape taken while it is still
/// open already counts every byte, from the eBPF counters in sockmap mode.
fn metrics_count_exactly(mode: &str) -> Result<()> {
    let dir = scratch(&format!("metrics-{mode}"));
    let (sink, up) = sink()?;
    let maddr = metrics_addr();
    let (m, upstream) = (maddr.to_string(), up.to_string());
    let s = splicer_in_mode(
        &dir,
        mode,
        up,
        &[
            "--accept-proxy", "v1",
            "--trusted-proxy", "127.0.0.9/32",
            "--untrusted-proxy", "reject",
            "--send-proxy", "v1",
            "--metrics", &m,
        ],
    )?;
    let spoof = |n: u16| format!("PROXY TCP4 198.51.100.{n} 127.0.0.3 5555 1883\r\n");
    for i in 0..3 {
        let mut c = connect_from(CLIENT_IP, s.listen)?;
        c.write_all(spoof(i).as_bytes())?;
        expect_closed(&mut c, "spoofer")?;
    }
    let mut bad = connect_from(LB_IP, s.listen)?;
    bad.write_all(b"PROXY TCP9 what\r\n")?;
    expect_closed(&mut bad, "bad header")?;
    wait_lines(&s.proc, "rejected:", 4)?;

    let mut c = connect_from(LB_IP, s.listen)?;
    c.write_all(b"PROXY TCP4 198.51.100.7 127.0.0.3 5555 1883\r\n")?;
    let mut b = accept_within(&sink, STEP)?.context("nothing reached the sink")?;
    let header = read_proxy_header(&mut b)?;
    ensure!(header.starts_with(b"PROXY TCP4 198.51.100.7 "), "{}", show(&header));
    const UP: u64 = 3 << 20;
    const DOWN: u64 = 1 << 20;
    let writer = {
        let mut c = c.try_clone()?;
        thread::spawn(move || send_pattern(&mut c, 1, UP))
    };
    let mut got = vec![0u8; UP as usize];
    b.read_exact(&mut got)?;
    writer.join().unwrap()?;
    expect_pattern(&mut std::io::Cursor::new(got), 1, UP)?;
    send_pattern(&mut b, 2, DOWN)?;
    let mut back = vec![0u8; DOWN as usize];
    c.read_exact(&mut back)?;
    expect_pattern(&mut std::io::Cursor::new(back), 2, DOWN)?;

    let l = "listener=\"default\"";
    let text = expect_metrics(
        maddr,
        &[
            (&format!("splicer_connections_accepted_total{{{l}}}"), 5.0),
            (&format!("splicer_connections_active{{{l}}}"), 1.0),
            (&format!("splicer_rejections_total{{{l},reason=\"untrusted_proxy_header\"}}"), 3.0),
            (&format!("splicer_rejections_total{{{l},reason=\"bad_proxy_header\"}}"), 1.0),
            (&format!("splicer_rejections_total{{{l},reason=\"access_denied\"}}"), 0.0),
            (&format!("splicer_connections_closed_total{{{l},reason=\"rejected\"}}"), 4.0),
            (&format!("splicer_proxy_untrusted_ignored_total{{{l}}}"), 0.0),
            (&format!("splicer_offload_mode{{mode=\"{mode}\"}}"), 1.0),
            (&format!("splicer_upstream_up{{{l},upstream=\"{upstream}\"}}"), 1.0),
            (&format!("splicer_upstream_connections_active{{{l},upstream=\"{upstream}\"}}"), 1.0),
            (&format!("splicer_upstream_connect_seconds_count{{{l},upstream=\"{upstream}\"}}"), 1.0),
        ],
    )?;
    let bytes = |dir: &str, path: &str| {
        metric(&text, &format!("splicer_bytes_total{{{l},direction=\"{dir}\",path=\"{path}\"}}"))
    };
    for (dir, want) in [("client_to_upstream", UP), ("upstream_to_client", DOWN)] {
        let (k, u) = (bytes(dir, "kernel")?, bytes(dir, "userspace")?);
        ensure!(k + u == want as f64, "{dir}: kernel {k} + userspace {u} != {want}\n{text}");
        match mode {
            // Bytes that came with the PROXY header may have been relayed
            // before the handoff; the rest is the kernel's.
            "sockmap" => ensure!(k > 0.0, "{dir}: nothing counted for the kernel\n{text}"),
            _ => ensure!(k == 0.0, "{dir}: kernel bytes in userspace mode\n{text}"),
        }
    }

    drop(c);
    drop(b);
    let closed = s.wait_closed(1, STEP)?;
    ensure!(close_num(&closed[0], "client_to_upstream")? == UP, "{}", closed[0]);
    let text = expect_metrics(
        maddr,
        &[
            (&format!("splicer_connections_active{{{l}}}"), 0.0),
            (&format!("splicer_upstream_connections_active{{{l},upstream=\"{upstream}\"}}"), 0.0),
        ],
    )?;
    let ended: f64 = ["client_closed", "upstream_closed"]
        .iter()
        .map(|r| metric(&text, &format!("splicer_connections_closed_total{{{l},reason=\"{r}\"}}")))
        .sum::<Result<f64>>()?;
    ensure!(ended == 1.0, "want one normal close:\n{text}");
    let path = if mode == "sockmap" { "kernel" } else { "userspace" };
    ensure!(
        metric(&text, &format!("splicer_connections_offloaded_total{{{l},path=\"{path}\"}}"))? == 1.0,
        "{text}"
    );
    // Nothing else is served there.
    let mut other = TcpStream::connect(maddr)?;
    other.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut resp = String::new();
    other.read_to_string(&mut resp)?;
    ensure!(resp.starts_with("HTTP/1.1 404 "), "{resp}");
    Ok(())
}

#[test]
fn metrics_count_exactly_sockmap() -> Result<()> {
    metrics_count_exactly("sockmap")
}

#[test]
fn metrics_count_exactly_userspace() -> Result<()> {
    metrics_count_exactly("userspace")
}

// --------------------------------------------------------- access control

/// allow/deny on TCP: by the peer's own address on one listener, by the
/// address in a trusted PROXY header on another.
#[test]
fn access_control_on_the_real_client_tcp() -> Result<()> {
    let dir = scratch("acl-tcp");
    let (sink, up) = sink()?;
    let (direct, behind) = (v4(SPLICER_IP, free_port(SPLICER_IP)), v4(SPLICER_IP, free_port(SPLICER_IP)));
    let maddr = metrics_addr();
    let config = write_config(
        &dir,
        &format!(
            r#"
            offload = "sockmap"
            metrics = "{maddr}"
            [[listener]]
            name = "direct"
            listen = "{direct}"
            upstream = ["{up}"]
            allow = ["127.0.0.0/24"]
            deny = ["127.0.0.7/32"]
            [[listener]]
            name = "behind"
            listen = "{behind}"
            upstream = ["{up}"]
            accept-proxy = "v2"
            trusted-proxy = ["127.0.0.9/32"]
            send-proxy = "v1"
            deny = ["198.51.100.0/24"]
            "#
        ),
    )?;
    let mut s = start_config(&dir, &config, direct, &[])?;
    s.proc.wait_listening(behind, STEP)?;

    // Allowed: its bytes reach the sink.
    let mut ok = connect_from(CLIENT_IP, direct)?;
    ok.write_all(b"hello")?;
    let mut b = accept_within(&sink, STEP)?.context("allowed client did not reach the sink")?;
    let mut got = [0u8; 5];
    b.read_exact(&mut got)?;
    ensure!(&got == b"hello");
    // Denied explicitly, and not in the allow list.
    for ip in [DENIED_IP, OUTSIDE_IP] {
        let mut c = connect_from(ip, direct)?;
        let _ = c.write_all(b"let me in");
        expect_closed(&mut c, &ip.to_string())?;
    }
    ensure!(accept_within(&sink, Duration::from_millis(300))?.is_none(), "a denied client reached the sink");

    // Behind a trusted LB: the header's address decides, not the LB's.
    let denied = expected_v2(v4([198, 51, 100, 7].into(), 4000), behind);
    let allowed = expected_v2(v4([203, 0, 113, 7].into(), 4001), behind);
    let mut c = connect_from(LB_IP, behind)?;
    c.write_all(&denied)?;
    expect_closed(&mut c, "198.51.100.7 via the LB")?;
    ensure!(accept_within(&sink, Duration::from_millis(300))?.is_none(), "a denied client reached the sink");
    let mut c = connect_from(LB_IP, behind)?;
    c.write_all(&allowed)?;
    let mut b2 = accept_within(&sink, STEP)?.context("allowed client behind the LB did not arrive")?;
    let header = read_proxy_header(&mut b2)?;
    ensure!(header == expected_v1(v4([203, 0, 113, 7].into(), 4001), behind), "{}", show(&header));

    let denials = s.proc.lines_with("access denied");
    ensure!(denials.len() == 3, "want 3 access denied lines:\n{}", s.proc.output());
    ensure!(denials.iter().any(|l| l.contains("client=198.51.100.7:4000 via=127.0.0.9:")), "{denials:?}");
    expect_metrics(
        maddr,
        &[
            ("splicer_rejections_total{listener=\"direct\",reason=\"access_denied\"}", 2.0),
            ("splicer_rejections_total{listener=\"behind\",reason=\"access_denied\"}", 1.0),
            ("splicer_connections_active{listener=\"direct\"}", 1.0),
        ],
    )?;
    drop((ok, b, c, b2));
    Ok(())
}

/// A minimal WebSocket upgrade request with an X-Forwarded-For chain.
fn upgrade(host: SocketAddr, xff: &str) -> Vec<u8> {
    format!(
        "GET /mqtt HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         X-Forwarded-For: {xff}\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
    )
    .into_bytes()
}

/// The status code of the HTTP response head on `s`.
fn response_status(s: &mut TcpStream) -> Result<u16> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ensure!(s.read(&mut b)? == 1, "closed mid-response: {}", show(&head));
        head.push(b[0]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {line}"))
}

/// allow/deny after the X-Forwarded-For walk: a trusted LB's chain names
/// the client; an untrusted peer's chain is ignored, so it cannot talk
/// its way past `allow`. Denied clients get 403; allowed ones reach aedes.
#[test]
fn access_control_through_a_websocket_xff_chain() -> Result<()> {
    let dir = scratch("acl-ws");
    let (_broker, ws) = start_aedes_ws(&dir)?;
    let maddr = metrics_addr();
    let listen = v4(SPLICER_IP, free_port(SPLICER_IP));
    let config = write_config(
        &dir,
        &format!(
            r#"
            offload = "sockmap"
            metrics = "{maddr}"
            [[listener]]
            name = "ws"
            listen = "{listen}"
            upstream = ["{ws}"]
            protocol = "ws"
            trusted-proxy = ["127.0.0.9/32", "10.0.0.0/8"]
            real-ip-header = "X-Forwarded-For"
            real-ip-recursive = true
            allow = ["198.51.100.0/24"]
            "#
        ),
    )?;
    let s = start_config(&dir, &config, listen, &[])?;
    let cases = [
        (LB_IP, "198.51.100.7, 10.1.1.1", 101),
        (LB_IP, "203.0.113.7, 10.1.1.1", 403),
        (CLIENT_IP, "198.51.100.7", 403),
    ];
    for (from, xff, want) in cases {
        let mut c = connect_from(from, listen)?;
        c.write_all(&upgrade(listen, xff))?;
        let status = response_status(&mut c)?;
        ensure!(status == want, "from {from} with X-Forwarded-For {xff}: {status}, want {want}");
        if want == 403 {
            let mut rest = Vec::new();
            c.read_to_end(&mut rest)?; // a FIN after the body, not a reset
        }
    }
    let denials = s.proc.lines_with("access denied");
    ensure!(denials.len() == 2, "{}", s.proc.output());
    ensure!(denials.iter().any(|l| l.contains("client=203.0.113.7:")), "{denials:?}");
    ensure!(denials.iter().any(|l| l.contains("client=127.0.0.2:")), "{denials:?}");
    expect_metrics(maddr, &[("splicer_rejections_total{listener=\"ws\",reason=\"access_denied\"}", 2.0)])?;
    Ok(())
}

// -------------------------------------------------------------- max-conns

#[test]
fn max_conns_refuses_beyond_the_limit() -> Result<()> {
    let dir = scratch("max-conns");
    let (sink, up) = sink()?;
    let maddr = metrics_addr();
    let m = maddr.to_string();
    let s = splicer_in_mode(&dir, "sockmap", up, &["--max-conns", "2", "--metrics", &m])?;
    let mut held = Vec::new();
    for _ in 0..2 {
        let c = connect_from(CLIENT_IP, s.listen)?;
        held.push((c, accept_within(&sink, STEP)?.context("held client did not arrive")?));
    }
    let mut third = connect_from(CLIENT_IP, s.listen)?;
    let _ = third.write_all(b"x");
    expect_closed(&mut third, "third client")?;
    ensure!(accept_within(&sink, Duration::from_millis(300))?.is_none(), "the third client reached the sink");
    ensure!(s.proc.lines_with("max-conns = 2").len() == 1, "{}", s.proc.output());
    // A place frees up: the next client gets in.
    drop(held.pop());
    s.wait_closed(1, STEP)?;
    let mut fourth = connect_from(CLIENT_IP, s.listen)?;
    fourth.write_all(b"in")?;
    let mut b = accept_within(&sink, STEP)?.context("fourth client did not arrive")?;
    let mut got = [0u8; 2];
    b.read_exact(&mut got)?;
    expect_metrics(
        maddr,
        &[
            ("splicer_rejections_total{listener=\"default\",reason=\"max_conns\"}", 1.0),
            ("splicer_connections_accepted_total{listener=\"default\"}", 4.0),
            ("splicer_connections_active{listener=\"default\"}", 2.0),
        ],
    )?;
    Ok(())
}

// ----------------------------------------------------------------- reload

/// A stream through a (spliced) connection keeps flowing, byte for byte,
/// across a SIGHUP that adds an upstream and a listener; a broken file is
/// refused and the old configuration keeps serving.
fn reload_under_load(mode: &str) -> Result<()> {
    let dir = scratch(&format!("reload-{mode}"));
    let (sink1, up1) = sink()?;
    let (sink2, up2) = sink()?;
    let listen = v4(SPLICER_IP, free_port(SPLICER_IP));
    let second = v4(SPLICER_IP, free_port(SPLICER_IP));
    let maddr = metrics_addr();
    let listener = |ups: &str| {
        format!(
            "offload = \"{mode}\"\nmetrics = \"{maddr}\"\n[[listener]]\nname = \"mqtt\"\nlisten = \"{listen}\"\nupstream = [{ups}]\n"
        )
    };
    let config = write_config(&dir, &listener(&format!("\"{up1}\"")))?;
    let mut s = start_config(&dir, &config, listen, &HANDOFF_NOW)?;

    const LEN: u64 = 1 << 30;
    let c = connect_from(CLIENT_IP, listen)?;
    let mut b = accept_within(&sink1, STEP)?.context("stream did not arrive")?;
    let writer = {
        let mut c = c.try_clone()?;
        thread::spawn(move || -> Result<()> {
            send_pattern(&mut c, 7, LEN)?;
            c.shutdown(Shutdown::Write)?;
            Ok(())
        })
    };
    let reader = thread::spawn(move || expect_pattern(&mut b, 7, LEN));
    // Reload while the stream flows (well before 1 GiB has passed).
    thread::sleep(Duration::from_millis(100));
    fs::write(
        &config,
        format!(
            "{}[[listener]]\nname = \"second\"\nlisten = \"{second}\"\nupstream = [\"{up2}\"]\n",
            listener(&format!("\"{up1}\", \"{up2}\""))
        ),
    )?;
    ensure!(s.proc.signal(libc::SIGHUP));
    s.proc.wait_line("reload: ", STEP)?;
    ensure!(!reader.is_finished(), "the stream ended before the reload: make it longer");
    ensure!(s.proc.lines_with("[mqtt] reloaded").len() == 1, "{}", s.proc.output());
    reader.join().unwrap().context("the stream across the reload")?;
    writer.join().unwrap()?;
    drop(c.shutdown(Shutdown::Write));
    let line = s.wait_closed(1, STEP)?.remove(0);
    ensure!(close_num(&line, "client_to_upstream")? == LEN, "{line}");
    if mode == "sockmap" {
        ensure!(close_num(&line, "kernel_bytes")? >= LEN - (1 << 20), "not spliced: {line}");
    }

    // The new upstream takes every other client; the new listener serves.
    let mut hits = [0, 0];
    for _ in 0..2 {
        let _c = connect_from(CLIENT_IP, listen)?;
        if accept_within(&sink1, Duration::from_millis(500))?.is_some() {
            hits[0] += 1;
        } else if accept_within(&sink2, STEP)?.is_some() {
            hits[1] += 1;
        }
    }
    ensure!(hits == [1, 1], "round-robin over both upstreams: {hits:?}");
    s.proc.wait_listening(second, STEP)?;
    let _c2 = connect_from(CLIENT_IP, second)?;
    accept_within(&sink2, STEP)?.context("the added listener does not forward")?;

    // A broken file: refused, logged, the old configuration keeps serving.
    fs::write(&config, "[[listener]\nlisten = oops")?;
    ensure!(s.proc.signal(libc::SIGHUP));
    s.proc.wait_line("reload refused", STEP)?;
    let _c3 = connect_from(CLIENT_IP, second)?;
    accept_within(&sink2, STEP)?.context("the old configuration stopped serving")?;
    expect_metrics(
        maddr,
        &[
            ("splicer_config_reloads_total{result=\"ok\"}", 1.0),
            ("splicer_config_reloads_total{result=\"failed\"}", 1.0),
        ],
    )?;
    drop(c);
    s.proc.stop();
    Ok(())
}

#[test]
fn reload_under_load_sockmap() -> Result<()> {
    reload_under_load("sockmap")
}

#[test]
fn reload_under_load_userspace() -> Result<()> {
    reload_under_load("userspace")
}

// ------------------------------------------------------------------ drain

/// SIGTERM mid-transfer: no new clients, the transfer finishes intact,
/// then splicer exits 0.
fn drain_lets_a_transfer_finish(mode: &str) -> Result<()> {
    let dir = scratch(&format!("drain-{mode}"));
    let (sink, up) = sink()?;
    let mut s = splicer_in_mode(&dir, mode, up, &[])?;
    const LEN: u64 = 64 << 20;
    let mut c = connect_from(CLIENT_IP, s.listen)?;
    let mut b = accept_within(&sink, STEP)?.context("no connection")?;
    let writer = {
        let mut c = c.try_clone()?;
        thread::spawn(move || -> Result<()> {
            // Paced, so the transfer is still going at the SIGTERM.
            for i in 0..16 {
                send_pattern(&mut c, 100 + i, LEN / 16)?;
                thread::sleep(Duration::from_millis(50));
            }
            c.shutdown(Shutdown::Write)?;
            Ok(())
        })
    };
    let reader = thread::spawn(move || -> Result<TcpStream> {
        for i in 0..16 {
            let mut part = (&mut b).take(LEN / 16);
            expect_pattern(&mut part, 100 + i, LEN / 16)?;
        }
        let mut rest = Vec::new();
        b.read_to_end(&mut rest)?;
        ensure!(rest.is_empty(), "{} bytes too many", rest.len());
        Ok(b)
    });
    thread::sleep(Duration::from_millis(200));
    ensure!(s.proc.signal(libc::SIGTERM));
    s.proc.wait_line("draining", STEP)?;
    ensure!(connect_from(CLIENT_IP, s.listen).is_err(), "still accepting while draining");
    ensure!(!writer.is_finished(), "the transfer ended before the SIGTERM: make it longer");
    writer.join().unwrap()?;
    let mut b = reader.join().unwrap()?;
    b.write_all(b"bye")?;
    b.shutdown(Shutdown::Write)?;
    let mut tail = Vec::new();
    c.read_to_end(&mut tail)?;
    ensure!(tail == b"bye", "{}", show(&tail));
    let st = s.proc.wait_exit(STEP)?;
    ensure!(st.success(), "exit {st}:\n{}", s.proc.output());
    let line = s.wait_closed(1, STEP)?.remove(0);
    ensure!(close_field(&line, "end") != Some("drained"), "{line}");
    ensure!(s.proc.lines_with("stopping:").len() == 1, "{}", s.proc.output());
    Ok(())
}

#[test]
fn drain_lets_a_transfer_finish_sockmap() -> Result<()> {
    drain_lets_a_transfer_finish("sockmap")
}

#[test]
fn drain_lets_a_transfer_finish_userspace() -> Result<()> {
    drain_lets_a_transfer_finish("userspace")
}

/// Past --drain-timeout, idle clients and brokers see a clean close (FIN,
/// not a reset), and splicer exits 0.
fn drain_timeout_closes_cleanly(mode: &str, extra: &[&str]) -> Result<()> {
    let dir = scratch(&format!("drain-timeout-{mode}-{}", extra.len()));
    let (sink, up) = sink()?;
    let args = [&["--drain-timeout", "1s"], extra].concat();
    let mut s = splicer_in_mode(&dir, mode, up, &args)?;
    let mut pairs = Vec::new();
    for i in 0..3 {
        let mut c = connect_from(CLIENT_IP, s.listen)?;
        let mut b = accept_within(&sink, STEP)?.context("no connection")?;
        c.write_all(&[i; 100])?;
        let mut got = [0u8; 100];
        b.read_exact(&mut got)?;
        pairs.push((c, b));
    }
    let started = Instant::now();
    ensure!(s.proc.signal(libc::SIGTERM));
    for (c, b) in &mut pairs {
        for (s, who) in [(c, "client"), (b, "broker")] {
            let mut rest = Vec::new();
            s.read_to_end(&mut rest)
                .with_context(|| format!("{who}: not a clean close"))?;
            ensure!(rest.is_empty(), "{who}: unexpected bytes");
        }
    }
    ensure!(started.elapsed() >= Duration::from_millis(900), "closed before the drain timeout");
    let st = s.proc.wait_exit(STEP)?;
    ensure!(st.success(), "exit {st}:\n{}", s.proc.output());
    let lines = s.wait_closed(3, STEP)?;
    ensure!(lines.iter().all(|l| close_field(l, "end") == Some("drained")), "{lines:?}");
    s.proc.wait_line("drain timeout: closing 3 connections", STEP)?;
    Ok(())
}

#[test]
fn drain_timeout_closes_cleanly_sockmap() -> Result<()> {
    drain_timeout_closes_cleanly("sockmap", &[])
}

#[test]
fn drain_timeout_closes_cleanly_userspace() -> Result<()> {
    drain_timeout_closes_cleanly("userspace", &[])
}

/// The same while the connections are still in `--handoff auto`'s
/// userspace phase (the drain comes before their 2 s of idleness).
#[test]
fn drain_timeout_closes_cleanly_before_the_handoff() -> Result<()> {
    drain_timeout_closes_cleanly("sockmap", &["--handoff", "auto"])
}

/// `--log-format json`: every line splicer writes is one JSON object, the
/// eBPF program's records among them; a close line carries its fields by
/// stable names and types (the client, the broker, bytes each way as
/// numbers, the end, and what the CONNECT said), matching its text.
#[test]
fn json_logs_carry_stable_fields() -> Result<()> {
    let dir = scratch("ops-json-logs");
    let broker = v4(BROKER_IP, free_port(BROKER_IP));
    let _mosquitto = start_mosquitto(&dir.join("broker"), broker)?;
    let s = splicer_in_mode(
        &dir,
        "sockmap",
        broker,
        &["--protocol", "mqtt", "--log-format", "json", "--log-level", "debug", "--handoff", "now"],
    )?;
    let (st, out, err) = run_with_timeout(
        Command::new("mosquitto_pub")
            .args(["-h", &s.listen.ip().to_string(), "-p", &s.listen.port().to_string()])
            .args(["-A", &CLIENT_IP.to_string(), "-i", "json-\"quoted\"", "-q", "1", "-t", "t/json", "-m", "hello"]),
        STEP,
    )?;
    ensure!(st.success(), "{out}{err}");
    s.wait_closed(1, STEP)?;
    let lines: Vec<serde_json::Value> = s
        .proc
        .output()
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("not one JSON object: {l}")))
        .collect::<Result<_>>()?;
    let closed = lines.iter().find(|l| l["event"] == "closed").context("no close event")?;
    eprintln!("{closed}");
    let field = |k: &str| closed[k].clone();
    ensure!(field("listener") == "default" && field("upstream") == broker.to_string().as_str(), "{closed}");
    let client = field("client");
    ensure!(client.as_str().is_some_and(|c| c.starts_with("127.0.0.2:")), "{closed}");
    ensure!(field("via").is_null(), "no via without a proxy: {closed}");
    ensure!(field("client_id") == "json-\"quoted\"" && field("mqtt_version") == "3.1.1", "{closed}");
    ensure!(field("end") == "client closed" && field("duration_s").is_f64(), "{closed}");
    let text = field("message");
    let text = text.as_str().context("message")?;
    for k in ["client_to_upstream", "upstream_to_client", "kernel_bytes"] {
        let n = field(k).as_u64().with_context(|| format!("{k} is not a number: {closed}"))?;
        ensure!(close_num(text, k)? == n, "{k}: {n} against the text {text}");
    }
    ensure!(field("kernel_bytes").as_u64() > Some(0), "the kernel carried nothing: {closed}");
    // The eBPF program's records come through the same formatter.
    ensure!(
        lines.iter().any(|l| l["target"] == "proxy_ebpf" && l["message"].as_str().is_some_and(|m| m.starts_with("splice: "))),
        "no eBPF record in JSON"
    );
    Ok(())
}
