//! `protocol = "tls-passthrough"` against the binary (issue 14, first
//! step): the ClientHello's server name picks the upstream group, the
//! upstream (nginx terminating TLS behind a PROXY header) sees the real
//! client and the client's own handshake, the kernel carries the rest;
//! what is not a ClientHello is refused before any upstream is touched;
//! and MQTT over TLS with mosquitto goes through.
use std::{
    io::{ErrorKind, Write},
    net::{Shutdown, SocketAddr, TcpListener},
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use splicer_tests::*;

/// An nginx that terminates TLS for `name` behind a PROXY header and
/// answers every connection with `<name> <client address> <SNI> <TLS version>`.
fn tls_upstream(dir: &Path, name: &str) -> Result<(Proc, SocketAddr)> {
    let d = dir.join(name);
    std::fs::create_dir_all(&d)?;
    let (cert, key) = self_signed(&d, name)?;
    let listen = v4(BROKER_IP, free_port(BROKER_IP));
    let p = start_nginx_stream(
        &d,
        listen,
        &format!(
            "server {{\n  listen {listen} ssl proxy_protocol;\n  ssl_certificate {};\n  \
             ssl_certificate_key {};\n  return \"{name} $proxy_protocol_addr $ssl_server_name $ssl_protocol\\n\";\n}}",
            cert.display(),
            key.display()
        ),
    )?;
    Ok((p, listen))
}

fn passthrough(dir: &Path, mode: &str, extra: &[&str]) -> Result<Splicer> {
    let mut args = vec!["--protocol", "tls-passthrough", "--offload", mode];
    if mode == "sockmap" {
        args.extend(HANDOFF_NOW);
    }
    args.extend_from_slice(extra);
    let s = Splicer::start(dir, &args)?;
    ensure!(s.offload() == mode, "asked for {mode}, got {}", s.offload());
    Ok(s)
}

/// The server name picks the upstream: exact, then `*.suffix`; a name no
/// group takes is refused. Each upstream sees the real client in the PROXY
/// header and the client's own handshake (its certificate reaches the
/// client, its SNI is the client's); the kernel carries what follows the
/// ClientHello.
#[test]
fn the_server_name_picks_the_upstream_and_it_sees_the_real_client() -> Result<()> {
    for mode in MODES {
        let dir = scratch(&format!("tls-pass-sni-{mode}"));
        let (_a, a) = tls_upstream(&dir, "a.example")?;
        let (_b, b) = tls_upstream(&dir, "b.example")?;
        let metrics = metrics_addr();
        let m_arg = metrics.to_string();
        let (sni_a, sni_b) = (format!("a.example={a}"), format!("*.b.example={b}"));
        let splicer = passthrough(
            &dir,
            mode,
            &["--send-proxy", "v1", "--sni", &sni_a, "--sni", &sni_b, "--metrics", &m_arg],
        )?;
        // What the upstream said is written to `said`.
        let said = dir.join("said");
        let exchange = |sni: Option<&str>| {
            TlsClient {
                servername: sni,
                out: Some(&said),
                ..Default::default()
            }
            .run(splicer.listen, STEP)
        };
        for (sni, upstream, cn) in [("a.example", "a.example", "a.example"), ("mqtt.b.example", "b.example", "b.example")] {
            let saw = exchange(Some(sni))?;
            ensure!(saw.cn == cn, "{mode} {sni}: the client got a certificate for {:?}", saw.cn);
            let body = std::fs::read_to_string(&said)?;
            let want = format!("{upstream} 127.0.0.2 {sni} ");
            ensure!(body.starts_with(&want), "{mode} {sni}: the upstream said {body:?}, want {want:?}…");
        }
        ensure!(exchange(Some("c.example")).is_err(), "{mode}: an unknown name got through");
        ensure!(exchange(None).is_err(), "{mode}: no name and no `*` group got through");
        let lines = splicer.wait_closed(2, STEP)?;
        for l in &lines {
            eprintln!("{mode}: {l}");
            ensure!(close_field(l, "sni").is_some_and(|s| s == "a.example" || s == "mqtt.b.example"), "{l}");
            if mode == "sockmap" {
                // The ClientHello was userspace's; the server's whole
                // handshake and answer went through the kernel.
                let (kernel, u2c) = (close_num(l, "kernel_bytes")?, close_num(l, "upstream_to_client")?);
                ensure!(kernel >= u2c && u2c > 0, "not carried by the kernel: {l}");
            }
        }
        expect_metrics(metrics, &[("splicer_rejections_total{listener=\"default\",reason=\"unknown_sni\"}", 2.0)])?;
    }
    Ok(())
}

/// A real ClientHello (Node's, asking for broker.example; the fuzz
/// target's seed) dripped a byte at a time, with a TLS record pipelined
/// behind it, reaches the upstream of its name exactly, after the PROXY v2
/// header, in both offload modes.
#[test]
fn a_dripped_client_hello_and_what_follows_reach_the_upstream_exactly() -> Result<()> {
    let hello = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/tls_hello/seed-broker.example"))?;
    let behind = [0x17, 3, 3, 0, 3, 1, 2, 3];
    for mode in MODES {
        let dir = scratch(&format!("tls-pass-drip-{mode}"));
        let broker = TcpListener::bind((BROKER_IP, free_port(BROKER_IP)))?;
        let route = format!("broker.example={}", broker.local_addr()?);
        let splicer = passthrough(&dir, mode, &["--send-proxy", "v2", "--sni", &route])?;
        let mut c = connect_from(CLIENT_IP, splicer.listen)?;
        c.set_nodelay(true)?;
        for (i, b) in hello.iter().enumerate() {
            match i + 1 == hello.len() {
                false => c.write_all(&[*b])?,
                true => c.write_all(&[&[*b][..], &behind].concat())?,
            }
            thread::sleep(Duration::from_millis(1));
        }
        let mut up = accept_within(&broker, STEP)?.context("no upstream connection")?;
        up.set_read_timeout(Some(STEP))?;
        let header = read_proxy_header(&mut up)?;
        ensure!(header == expected_v2(local(&c), splicer.listen), "{mode}: header {}", show(&header));
        let mut got = vec![0u8; hello.len() + behind.len()];
        std::io::Read::read_exact(&mut up, &mut got)?;
        ensure!(got == [&hello[..], &behind].concat(), "{mode}: the upstream got {}", show(&got));
        drop((c, up));
        let line = splicer.wait_closed(1, STEP)?.remove(0);
        ensure!(close_field(&line, "sni") == Some("broker.example"), "{mode}: {line}");
    }
    Ok(())
}

/// Garbage, plaintext MQTT and HTTP, a ServerHello, an oversized
/// ClientHello, one cut short by a FIN, and a client that stalls: each
/// refused (closed), counted, nothing reaching the upstream; waiting costs
/// no CPU.
#[test]
fn what_is_not_a_client_hello_is_refused_before_any_upstream() -> Result<()> {
    let dir = scratch("tls-pass-refusals");
    let broker = TcpListener::bind((BROKER_IP, free_port(BROKER_IP)))?;
    broker.set_nonblocking(true)?;
    let up = broker.local_addr()?.to_string();
    let metrics = metrics_addr();
    let m_arg = metrics.to_string();
    let splicer = passthrough(
        &dir,
        "sockmap",
        &["--upstream", &up, "--tls-hello-max", "1024", "--tls-hello-timeout", "1s", "--metrics", &m_arg],
    )?;
    let hello_start = |len: u16| {
        let mut h = vec![0x16, 3, 1, 0, 4, 1];
        h.extend(&len.to_be_bytes()[..]);
        h
    };
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("garbage", b"\x00\x01\x02\x03\x04\x05".to_vec(), false),
        ("plaintext MQTT", mqtt::Connect::new(4, "x").bytes(), false),
        ("HTTP", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), false),
        ("a ServerHello", vec![0x16, 3, 3, 0, 4, 2, 0, 0, 0], false),
        ("oversized", [&[0x16, 3, 1, 0, 4, 1, 0][..], &[8, 0]].concat(), false),
        ("cut short, then FIN", hello_start(300), true),
    ];
    for (what, sent, fin) in &cases {
        let mut c = connect_from(CLIENT_IP, splicer.listen)?;
        c.write_all(sent)?;
        if *fin {
            c.shutdown(Shutdown::Write)?;
        }
        let got = read_to_end_timeout(&mut c, STEP).unwrap_or_default();
        ensure!(got.is_empty(), "{what}: the client got {}", show(&got));
    }
    let cpu_before = splicer.proc.cpu_seconds();
    let t0 = Instant::now();
    let mut stalled = connect_from(CLIENT_IP, splicer.listen)?;
    stalled.write_all(&hello_start(300))?;
    ensure!(read_to_end_timeout(&mut stalled, STEP)?.is_empty());
    let after = t0.elapsed();
    ensure!((Duration::from_millis(900)..Duration::from_secs(3)).contains(&after), "a stalled hello cut after {after:?}");
    thread::sleep(Duration::from_millis(500));
    let cpu = splicer.proc.cpu_seconds() - cpu_before;
    ensure!(cpu < 0.3, "splicer used {cpu:.2} CPU-seconds on a stalled hello");
    match broker.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => anyhow::bail!("a refused client reached the upstream: {other:?}"),
    }
    let by_reason = |r: &str| format!("splicer_tls_hello_rejections_total{{listener=\"default\",reason=\"{r}\"}}");
    let series = [
        ("splicer_rejections_total{listener=\"default\",reason=\"bad_tls_hello\"}".to_string(), cases.len() as f64 + 1.0),
        (by_reason("not_tls"), 3.0),
        (by_reason("malformed"), 1.0),
        (by_reason("too_large"), 1.0),
        (by_reason("closed"), 1.0),
        (by_reason("timeout"), 1.0),
    ];
    let refs: Vec<(&str, f64)> = series.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    expect_metrics(metrics, &refs)?;
    wait_lines(&splicer.proc, "refused: ", cases.len() + 1)?;
    Ok(())
}

/// mosquitto_pub and mosquitto_sub over TLS through a passthrough listener
/// to mosquitto's TLS listener (no `sni` groups: every name goes to
/// `upstream`); every message arrives, in order.
#[test]
fn mqtt_over_tls_passes_through_to_mosquitto() -> Result<()> {
    for mode in MODES {
        let dir = scratch(&format!("tls-pass-mosquitto-{mode}"));
        let (cert, key) = self_signed(&dir, "broker.example")?;
        let addr = v4(BROKER_IP, free_port(BROKER_IP));
        let conf = format!(
            "listener {} {}\ncertfile {}\nkeyfile {}\nallow_anonymous true\npersistence false\nlog_dest stderr\nlog_type all\n",
            addr.port(),
            addr.ip(),
            cert.display(),
            key.display()
        );
        let mut broker = match spawn_mosquitto(&dir, &conf, addr)? {
            Ok(b) => b,
            Err((st, out)) => anyhow::bail!("mosquitto with TLS exited ({st}):\n{out}"),
        };
        let up = addr.to_string();
        let splicer = passthrough(&dir, mode, &["--upstream", &up])?;
        let (host, port) = (SPLICER_IP.to_string(), splicer.listen.port().to_string());
        let tls = ["--cafile", cert.to_str().context("path")?, "--insecure"];
        let mut sub = Proc::spawn_apart(
            "sub",
            &dir,
            Command::new("mosquitto_sub")
                .args(["-h", &host, "-p", &port, "-A", &CLIENT_IP.to_string(), "-i", "tls-sub", "-q", "1"])
                .args(tls)
                .args(["-t", "tls/t", "-C", "3"]),
        )?;
        broker
            .wait_line("Sending SUBACK to tls-sub", STEP)
            .with_context(|| format!("{mode}: subscriber: {}", sub.stderr()))?;
        for i in 1..=3 {
            let (st, out, err) = run_with_timeout(
                Command::new("mosquitto_pub")
                    .args(["-h", &host, "-p", &port, "-A", &CLIENT_IP.to_string(), "-q", "1"])
                    .args(tls)
                    .args(["-t", "tls/t", "-m", &format!("secret-{i}")]),
                STEP,
            )?;
            ensure!(st.success(), "{mode}: mosquitto_pub: {st}\n{out}{err}");
        }
        ensure!(sub.wait_exit(STEP)?.success(), "{mode}: subscriber: {}", sub.stderr());
        ensure!(sub.output() == "secret-1\nsecret-2\nsecret-3\n", "{mode}: subscriber got {:?}", sub.output());
        // libmosquitto sends the IP literal it was given as the name.
        let lines = splicer.wait_closed(4, STEP)?;
        ensure!(lines.iter().all(|l| close_field(l, "sni").is_some()), "{}", lines.join("\n"));
    }
    Ok(())
}
