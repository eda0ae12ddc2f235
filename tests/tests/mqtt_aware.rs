//! `protocol = "mqtt"` against the binary (issue 13): the CONNECT read
//! before an upstream is chosen and passed on byte for byte, what is not a
//! CONNECT refused before any upstream is touched, `balance = "client-id"`
//! keeping a client's session on its broker, and the CONNECT's keep-alive
//! closing a vanished client while the kernel carries it.
use std::{
    collections::HashMap,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use splicer_testkit::ws;
use splicer_tests::{mqtt::Connect, rawtcp::Netns, *};

/// splicer in `mode` with `--protocol mqtt` and `extra`.
fn mqtt_splicer(dir: &std::path::Path, mode: &str, upstream: SocketAddr, extra: &[&str]) -> Result<Splicer> {
    let mut args = vec!["--protocol", "mqtt"];
    args.extend_from_slice(extra);
    splicer_in_mode(dir, mode, upstream, &args)
}

/// The close line's quoted `key="…"` value, unquoted.
fn quoted<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    close_field(line, key)?.strip_prefix('"')?.strip_suffix('"')
}

// ------------------------------------------ the CONNECT, byte for byte

/// A client's CONNECT, pipelined behind it or dripped a byte at a time,
/// reaches the broker unchanged right after the PROXY header, and the close
/// line names who connected; the password appears nowhere in the log.
#[test]
fn the_connect_reaches_the_broker_byte_for_byte_after_the_proxy_header() -> Result<()> {
    for mode in MODES {
        let dir = scratch(&format!("mqtt-aware-bytes-{mode}"));
        let (broker, broker_addr) = listen_on(BROKER_IP)?;
        let metrics = metrics_addr();
        let m_arg = metrics.to_string();
        let splicer = mqtt_splicer(&dir, mode, broker_addr, &["--send-proxy", "v2", "--metrics", &m_arg])?;
        let v5 = Connect {
            username: Some("alice"),
            password: Some(b"hunter2-secret"),
            keepalive: 60,
            ..Connect::new(5, "sensor-5")
        };
        let v311 = Connect {
            username: Some("bob"),
            password: Some(b"hunter2-secret"),
            ..Connect::new(4, "sensor-311")
        };
        // A QoS 0 PUBLISH and a PINGREQ behind the CONNECT.
        let behind = [mqtt::packet(0x30, b"\x00\x01tpayload"), vec![0xc0, 0x00]].concat();
        for (connect, drip, version) in [(&v5, false, "5.0"), (&v311, true, "3.1.1")] {
            let sent = [connect.bytes(), behind.clone()].concat();
            let mut c = connect_from(CLIENT_IP, splicer.listen)?;
            c.set_nodelay(true)?;
            match drip {
                false => c.write_all(&sent)?,
                true => {
                    for b in &sent {
                        c.write_all(&[*b])?;
                        thread::sleep(Duration::from_millis(3));
                    }
                }
            }
            let mut up = accept_within(&broker, STEP)?.context("splicer never connected upstream")?;
            up.set_read_timeout(Some(STEP))?;
            let header = read_proxy_header(&mut up)?;
            ensure!(header == expected_v2(local(&c), splicer.listen), "{mode}: header {}", show(&header));
            let mut got = vec![0u8; sent.len()];
            up.read_exact(&mut got)?;
            ensure!(got == sent, "{mode} {version}: broker got {}\nwant {}", show(&got), show(&sent));
            // The broker's CONNACK reaches the client.
            up.write_all(&[0x20, 0x02, 0x00, 0x00])?;
            let mut ack = [0u8; 4];
            c.read_exact(&mut ack)?;
            ensure!(ack == [0x20, 0x02, 0x00, 0x00]);
            c.shutdown(Shutdown::Write)?;
            ensure!(read_to_end_timeout(&mut up, STEP)?.is_empty());
            drop(up);
            let line = splicer.close_line_for(local(&c), STEP)?;
            ensure!(
                quoted(&line, "client_id") == Some(connect.client_id)
                    && quoted(&line, "username") == connect.username
                    && close_field(&line, "mqtt_version") == Some(version)
                    && close_num(&line, "client_to_upstream")? == sent.len() as u64,
                "{mode}: close line {line}"
            );
        }
        ensure!(!splicer.proc.output().contains("hunter2"), "the password reached the log");
        expect_metrics(
            metrics,
            &[
                ("splicer_mqtt_connections_total{listener=\"default\",version=\"5.0\"}", 1.0),
                ("splicer_mqtt_connections_total{listener=\"default\",version=\"3.1.1\"}", 1.0),
                ("splicer_mqtt_connections_total{listener=\"default\",version=\"3.1\"}", 0.0),
            ],
        )?;
    }
    Ok(())
}

/// A CONNECT cut in two at every byte boundary arrives whole.
#[test]
fn a_connect_split_at_every_byte_boundary_arrives_whole() -> Result<()> {
    let dir = scratch("mqtt-aware-split");
    let (broker, broker_addr) = listen_on(BROKER_IP)?;
    let splicer = mqtt_splicer(&dir, "userspace", broker_addr, &[])?;
    let connect = Connect {
        username: Some("u"),
        password: Some(b"p"),
        keepalive: 30,
        ..Connect::new(5, "split")
    }
    .bytes();
    for cut in 1..connect.len() {
        let mut c = connect_from(CLIENT_IP, splicer.listen)?;
        c.set_nodelay(true)?;
        c.write_all(&connect[..cut])?;
        thread::sleep(Duration::from_millis(15));
        c.write_all(&connect[cut..])?;
        let mut up = accept_within(&broker, STEP)?.with_context(|| format!("cut {cut}: no upstream"))?;
        up.set_read_timeout(Some(STEP))?;
        let mut got = vec![0u8; connect.len()];
        up.read_exact(&mut got)?;
        ensure!(got == connect, "cut {cut}: {}", show(&got));
    }
    Ok(())
}

// ------------------------------------------------------ refusals

/// What a client sends first, what it must get back before the close, and
/// the rejection's reason label.
struct Bad {
    what: &'static str,
    sent: Vec<u8>,
    answer: &'static [u8],
    reason: &'static str,
}

fn bad_first_packets() -> Vec<Bad> {
    let with_flags = |level, f: u8| {
        let mut b = Connect::new(level, "x").bytes();
        b[9] |= f; // the connect flags: fixed header 2, name 6, level 1
        b
    };
    let level = |name: &[u8], level: u8| {
        let mut body = Vec::new();
        mqtt::put_str(&mut body, name);
        body.extend([level, 0x02, 0, 0, 0, 1, b'x']);
        mqtt::packet(0x10, &body)
    };
    let huge = Connect {
        username: Some(&*Box::leak("u".repeat(2000).into_boxed_str())),
        ..Connect::new(5, "big")
    };
    vec![
        Bad { what: "HTTP", sent: b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), answer: b"", reason: "not_connect" },
        Bad {
            what: "TLS ClientHello",
            sent: vec![0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03],
            answer: b"",
            reason: "not_connect",
        },
        Bad { what: "a PUBLISH first", sent: mqtt::packet(0x30, b"\x00\x01tx"), answer: b"", reason: "not_connect" },
        Bad { what: "reserved flag, 3.1.1", sent: with_flags(4, 0x01), answer: b"", reason: "malformed" },
        Bad {
            what: "reserved flag, 5.0",
            sent: with_flags(5, 0x01),
            answer: &[0x20, 0x03, 0x00, 0x81, 0x00],
            reason: "malformed",
        },
        Bad { what: "remaining length over 4 bytes", sent: vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x01], answer: b"", reason: "malformed" },
        Bad {
            what: "level 6",
            sent: level(b"MQTT", 6),
            answer: &[0x20, 0x03, 0x00, 0x84, 0x00],
            reason: "unsupported_version",
        },
        Bad { what: "level 2", sent: level(b"MQTT", 2), answer: &[0x20, 0x02, 0x00, 0x01], reason: "unsupported_version" },
        Bad {
            what: "over mqtt-connect-max",
            sent: huge.bytes(),
            answer: &[0x20, 0x03, 0x00, 0x95, 0x00],
            reason: "too_large",
        },
        Bad { what: "truncated, then FIN", sent: Connect::new(4, "cut").bytes()[..9].to_vec(), answer: b"", reason: "closed" },
        Bad {
            what: "an MQTT 5 property twice",
            sent: {
                let mut body = Vec::new();
                mqtt::put_str(&mut body, b"MQTT");
                body.extend([5, 0x02, 0, 0, 10, 0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2, 0, 1, b'x']);
                mqtt::packet(0x10, &body)
            },
            answer: &[0x20, 0x03, 0x00, 0x82, 0x00],
            reason: "protocol_error",
        },
        Bad {
            what: "an empty client ID in 3.1",
            sent: Connect::new(3, "").bytes(),
            answer: &[0x20, 0x02, 0x00, 0x02],
            reason: "identifier_rejected",
        },
    ]
}

/// Junk, HTTP, TLS, malformed, oversized and protocol-breaking first
/// packets, a truncated
/// CONNECT, a silent client and a slow drip: each refused as a broker would
/// refuse it, counted and logged, and not one reaches an upstream. Waiting
/// for the slow ones burns no CPU.
#[test]
fn what_is_not_a_connect_is_refused_before_any_upstream() -> Result<()> {
    let dir = scratch("mqtt-aware-refusals");
    let (broker, broker_addr) = listen_on(BROKER_IP)?;
    broker.set_nonblocking(true)?;
    let metrics = metrics_addr().to_string();
    let splicer = mqtt_splicer(
        &dir,
        "sockmap",
        broker_addr,
        &["--mqtt-connect-max", "1024", "--mqtt-connect-timeout", "1s", "--metrics", &metrics],
    )?;
    let cases = bad_first_packets();
    for bad in &cases {
        let mut c = connect_from(CLIENT_IP, splicer.listen)?;
        c.write_all(&bad.sent)?;
        if bad.reason == "closed" {
            c.shutdown(Shutdown::Write)?;
        }
        let got = read_to_end_timeout(&mut c, STEP).with_context(|| bad.what)?;
        ensure!(got == bad.answer, "{}: answered {}, want {}", bad.what, show(&got), show(bad.answer));
    }
    // Silent, and dripping a valid CONNECT too slowly: cut at the timeout,
    // without an answer, whatever the drip.
    let cpu_before = splicer.proc.cpu_seconds();
    let silent = connect_from(CLIENT_IP, splicer.listen)?;
    let mut drip = connect_from(CLIENT_IP, splicer.listen)?;
    let t0 = Instant::now();
    let slow = Connect::new(4, "slow-drip-client").bytes();
    let mut closed_at = None;
    for b in &slow {
        if drip.write_all(&[*b]).is_err() {
            break;
        }
        thread::sleep(Duration::from_millis(100));
        let mut probe = [0u8; 1];
        drip.set_nonblocking(true)?;
        let r = drip.read(&mut probe);
        drip.set_nonblocking(false)?;
        match r {
            Ok(0) => {
                closed_at = Some(t0.elapsed());
                break;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => anyhow::bail!("drip: {other:?}"),
        }
    }
    let closed_at = closed_at.context("the dripping client was never cut off")?;
    ensure!(
        (Duration::from_millis(900)..Duration::from_secs(3)).contains(&closed_at),
        "the drip was cut after {closed_at:?}, want the 1 s timeout"
    );
    let mut silent = silent;
    ensure!(read_to_end_timeout(&mut silent, STEP)?.is_empty());
    let cpu = splicer.proc.cpu_seconds() - cpu_before;
    ensure!(cpu < 0.3, "splicer used {cpu:.2} CPU-seconds waiting for slow clients");

    match broker.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => anyhow::bail!("a refused client reached the upstream: {other:?}"),
    }
    let mut want: HashMap<&str, f64> = HashMap::from([("timeout", 2.0)]);
    for bad in &cases {
        *want.entry(bad.reason).or_default() += 1.0;
    }
    let series: Vec<(String, f64)> = want
        .iter()
        .map(|(r, n)| (format!("splicer_mqtt_connect_rejections_total{{listener=\"default\",reason=\"{r}\"}}"), *n))
        .chain([(
            "splicer_rejections_total{listener=\"default\",reason=\"bad_mqtt_connect\"}".to_string(),
            cases.len() as f64 + 2.0,
        )])
        .collect();
    let refs: Vec<(&str, f64)> = series.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    expect_metrics(metrics.parse()?, &refs)?;
    let refused = wait_lines(&splicer.proc, ": refused: ", cases.len() + 2)?;
    ensure!(
        refused.iter().all(|l| l.contains("client=127.0.0.2:")),
        "rejection lines name the peer:\n{}",
        refused.join("\n")
    );
    Ok(())
}

// ------------------------------------------ client-id routing

/// Three independent mosquitto brokers, on BROKER_IP.
fn three_brokers(dir: &std::path::Path) -> Result<Vec<(Proc, SocketAddr)>> {
    (0..3)
        .map(|i| {
            let addr = v4(BROKER_IP, free_port(BROKER_IP));
            let b = start_mosquitto(&dir.join(format!("broker{i}")), addr)?;
            Ok((b, addr))
        })
        .collect()
}

/// A persistent QoS 1 subscriber connects through splicer, leaves,
/// messages are published to every broker while it is away, and it comes
/// back from another address: what it receives.
fn queued_while_away(balance: &str) -> Result<Vec<String>> {
    let dir = scratch(&format!("mqtt-aware-sessions-{balance}"));
    let brokers = three_brokers(&dir)?;
    let mut args = vec!["--protocol", "mqtt", "--balance", balance, "--offload", "userspace"];
    let ups: Vec<String> = brokers.iter().map(|(_, a)| a.to_string()).collect();
    for u in &ups {
        args.extend(["--upstream", u.as_str()]);
    }
    let splicer = Splicer::start(&dir, &args)?;
    let port = splicer.listen.port().to_string();
    let sub = |from: Ipv4Addr, extra: &[&str]| {
        let mut cmd = Command::new("mosquitto_sub");
        cmd.args(["-h", &SPLICER_IP.to_string(), "-p", &port, "-A", &from.to_string()])
            .args(["-i", "keeper", "-c", "-q", "1", "-t", "away/t"])
            .args(extra);
        cmd
    };
    let (st, out, err) = run_with_timeout(&mut sub(CLIENT_IP, &["-E"]), STEP)?;
    ensure!(st.success(), "first subscribe: {st}\n{out}{err}");
    for (_, addr) in &brokers {
        for i in 1..=3 {
            let (st, out, err) = run_with_timeout(
                Command::new("mosquitto_pub")
                    .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
                    .args(["-q", "1", "-t", "away/t", "-m", &format!("msg-{i}")]),
                STEP,
            )?;
            ensure!(st.success(), "publish to {addr}: {st}\n{out}{err}");
        }
    }
    // Back from 127.0.0.5: a different source address.
    let (_, out, _) = run_with_timeout(&mut sub(Ipv4Addr::new(127, 0, 0, 5), &["-C", "3", "-W", "4"]), STEP)?;
    let lines = splicer.wait_closed(2, STEP)?;
    for l in &lines {
        eprintln!("{balance}: {l}");
    }
    Ok(out.lines().map(str::to_string).collect())
}

/// With `balance = "client-id"` a persistent session is found again from
/// another address: every queued message arrives. With round-robin the
/// same client lands on another broker and gets nothing (the test can
/// fail).
#[test]
fn client_id_routing_keeps_a_session_across_reconnects() -> Result<()> {
    let got = queued_while_away("client-id")?;
    ensure!(got == ["msg-1", "msg-2", "msg-3"], "client-id: received {got:?}");
    let got = queued_while_away("round-robin")?;
    ensure!(got.is_empty(), "round-robin found the session anyway: {got:?}");
    Ok(())
}

/// Upstream listeners that take connections and read them to the end.
fn sinks(n: usize) -> Result<Vec<SocketAddr>> {
    (0..n)
        .map(|_| {
            let (l, addr) = listen_on(BROKER_IP)?;
            thread::spawn(move || sink(l));
            Ok(addr)
        })
        .collect()
}

fn sink(l: TcpListener) {
    for mut s in l.incoming().flatten() {
        let mut buf = [0u8; 4096];
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// Which upstream each client ID went to through `splicer`.
fn placement(splicer: &Splicer, ids: &[String]) -> Result<HashMap<String, String>> {
    let before = splicer.closed_lines().len();
    let mut sent = 0;
    // In batches, so the upstreams' accept queues never overflow.
    for batch in ids.chunks(100) {
        for id in batch {
            let mut c = connect_from(CLIENT_IP, splicer.listen)?;
            c.write_all(&Connect::new(4, id).bytes())?;
            c.shutdown(Shutdown::Write)?;
        }
        sent += batch.len();
        splicer.wait_closed(before + sent, STEP)?;
    }
    let lines = splicer.closed_lines();
    lines[before..]
        .iter()
        .map(|l| {
            let id = quoted(l, "client_id").with_context(|| format!("no client_id: {l}"))?;
            let up = close_field(l, "upstream").with_context(|| format!("no upstream: {l}"))?;
            Ok((id.to_string(), up.to_string()))
        })
        .collect()
}

/// Two splicer processes with the same upstreams send each of 1,000
/// client IDs to the same broker; without one of the three brokers, only
/// that broker's clients move.
#[test]
fn two_nodes_agree_and_removing_a_broker_moves_only_its_clients() -> Result<()> {
    let dir = scratch("mqtt-aware-nodes");
    let ups: Vec<String> = sinks(3)?.iter().map(ToString::to_string).collect();
    let start = |name: &str, ups: &[String]| {
        let mut args = vec!["--protocol", "mqtt", "--balance", "client-id", "--offload", "userspace"];
        for u in ups {
            args.extend(["--upstream", u.as_str()]);
        }
        Splicer::start(&dir.join(name), &args)
    };
    for d in ["a", "b", "c"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let ids: Vec<String> = (0..1000).map(|i| format!("device-{i:04}")).collect();
    let a = placement(&start("a", &ups)?, &ids)?;
    let b = placement(&start("b", &ups)?, &ids)?;
    ensure!(a.len() == ids.len() && a == b, "two nodes disagree");
    let mut share: HashMap<&str, usize> = HashMap::new();
    for up in a.values() {
        *share.entry(up.as_str()).or_default() += 1;
    }
    eprintln!("share: {share:?}");
    ensure!(share.len() == 3 && share.values().all(|&n| n > 250), "uneven: {share:?}");
    let without = [ups[0].clone(), ups[2].clone()];
    let c = placement(&start("c", &without)?, &ids)?;
    let mut moved = 0;
    for id in &ids {
        if a[id] == ups[1] {
            moved += 1;
            ensure!(c[id] != ups[1], "{id} still on the removed broker");
        } else {
            ensure!(c[id] == a[id], "{id} moved from {} to {} though its broker stayed", a[id], c[id]);
        }
    }
    eprintln!("{moved} of {} clients moved, all from the removed broker", ids.len());
    Ok(())
}

// ------------------------------------------------------ keep-alive

/// Drops every packet from the client to splicer inside `ns`: the client
/// vanishes without a FIN or RST.
fn vanish(ns: &Netns, client: SocketAddr, splicer: SocketAddr) -> Result<()> {
    ns.nft(&format!(
        "table inet splicer_test {{\n chain in {{\n  type filter hook input priority 0;\n  \
         ip saddr {} tcp sport {} ip daddr {} tcp dport {} drop\n }}\n}}\n",
        client.ip(),
        client.port(),
        splicer.ip(),
        splicer.port()
    ))
}

/// How long after a client vanished splicer closed it, or None within
/// `wait`. The connection is carried by `mode` (the kernel, in sockmap
/// mode) when the client goes.
fn vanished_client_closed_after(mode: &str, protocol: &str, keepalive: u16, wait: Duration) -> Result<Option<Duration>> {
    let ns = Netns::create(&format!("ka-{mode}-{protocol}"))?;
    let mode = mode.to_string();
    let protocol = protocol.to_string();
    // Everything (client, splicer, upstream) in the namespace: a thread
    // of its own enters it, and the namespace goes when the thread ends.
    let run = thread::spawn(move || -> Result<Option<Duration>> {
        ns.enter()?;
        let dir = scratch(&format!("mqtt-aware-keepalive-{mode}-{protocol}"));
        let (broker, broker_addr) = listen_on(BROKER_IP)?;
        let splicer = splicer_in_mode(&dir, &mode, broker_addr, &["--protocol", &protocol])?;
        let mut c = connect_from(CLIENT_IP, splicer.listen)?;
        c.write_all(&Connect { keepalive, ..Connect::new(4, "vanishing") }.bytes())?;
        let mut up = accept_within(&broker, STEP)?.context("no upstream")?;
        // A CONNACK through whoever carries the connection now.
        thread::sleep(Duration::from_millis(300));
        up.write_all(&[0x20, 0x02, 0x00, 0x00])?;
        let mut ack = [0u8; 4];
        c.read_exact(&mut ack)?;
        vanish(&ns, local(&c), splicer.listen)?;
        let t0 = Instant::now();
        let line = splicer.close_line_for(local(&c), wait).ok();
        let after = t0.elapsed();
        if let Some(l) = &line {
            eprintln!("{mode} {protocol}: closed after {after:?}: {l}");
            if mode == "sockmap" {
                ensure!(close_num(l, "kernel_bytes")? == 4, "not carried by the kernel: {l}");
            }
        }
        drop(up);
        Ok(line.map(|_| after))
    });
    run.join().map_err(|_| anyhow::anyhow!("keep-alive thread panicked"))?
}

/// A client that vanishes is closed by the kernel within 1.5 keep-alives
/// (plus a probe interval), while spliced; without the CONNECT read
/// (protocol tcp) nothing closes it.
#[test]
fn a_vanished_client_is_closed_after_one_and_a_half_keepalives() -> Result<()> {
    for mode in MODES {
        let after = vanished_client_closed_after(mode, "mqtt", 2, Duration::from_secs(8))?
            .with_context(|| format!("{mode}: the vanished client was never closed"))?;
        ensure!(
            (Duration::from_secs(2)..Duration::from_millis(4500)).contains(&after),
            "{mode}: closed after {after:?}, want about 3 s (1.5 x keep-alive 2 s)"
        );
    }
    let control = vanished_client_closed_after("sockmap", "tcp", 2, Duration::from_secs(6))?;
    ensure!(control.is_none(), "protocol tcp closed the vanished client too ({control:?}): the test cannot tell");
    Ok(())
}

// ------------------------------------------------ MQTT.js and mosquitto

/// MQTT.js clients of MQTT 5 and 3.1.1, with a username and password,
/// through `protocol = "mqtt"` to mosquitto: a QoS 1 message gets across,
/// and each close line names the client, its username and its version.
#[test]
fn mqttjs_5_and_3_1_1_through_an_mqtt_listener() -> Result<()> {
    for mode in MODES {
        let dir = scratch(&format!("mqtt-aware-mqttjs-{mode}"));
        let addr = v4(BROKER_IP, free_port(BROKER_IP));
        let _broker = start_mosquitto(&dir, addr)?;
        let splicer = mqtt_splicer(&dir, mode, addr, &["--send-proxy", "off"])?;
        let url = format!("mqtt://{}", splicer.listen);
        for version in ["5", "4"] {
            let (sub_id, pub_id) = (format!("js-sub-{mode}-{version}"), format!("js-pub-{mode}-{version}"));
            let login = ["--mqtt-version", version, "--username", "carol", "--password", "hunter2-secret", "--qos", "1"];
            let mut sub = Proc::spawn_apart(
                &sub_id,
                &dir,
                mqtt_client_cmd(&url, &sub_id, &login).args(["--subscribe", "js/t", "--count", "1", "--timeout-ms", "15000"]),
            )?;
            sub.wait_line("\"event\":\"subscribed\"", STEP)?;
            let out = run_mqtt_client(
                &url,
                &pub_id,
                &[&login[..], &["--publish", "js/t", "hello"]].concat(),
                STEP,
            )?;
            ensure!(out.lines().any(|l| is_event(l, "published")), "publisher:\n{out}");
            ensure!(sub.wait_exit(STEP)?.success(), "subscriber: {}", sub.stderr());
            let got = sub.output();
            ensure!(
                got.lines().any(|l| is_event(l, "message") && json_field(l, "payload").as_deref() == Some("hello")),
                "MQTT {version}: subscriber got\n{got}"
            );
            let want_version = if version == "5" { "5.0" } else { "3.1.1" };
            for id in [&sub_id, &pub_id] {
                let line = wait_lines(&splicer.proc, &format!("client_id=\"{id}\""), 1)?
                    .into_iter()
                    .find(|l| l.contains("] closed "))
                    .with_context(|| format!("no close line for {id}"))?;
                ensure!(
                    quoted(&line, "username") == Some("carol") && close_field(&line, "mqtt_version") == Some(want_version),
                    "{mode}: {line}"
                );
            }
        }
        ensure!(!splicer.proc.output().contains("hunter2"), "the password reached the log");
    }
    Ok(())
}

// ------------------------------------------------- reconnect storms

/// Opens `n` connections from `from` at once, each sending `first(i)`
/// (and nothing more); then counts those splicer kept open (passed on to
/// the upstream, which holds them) against those it closed at once.
fn admitted(splicer: &Splicer, from: Ipv4Addr, n: usize, first: impl Fn(usize) -> Vec<u8>) -> Result<usize> {
    let mut conns = Vec::new();
    for i in 0..n {
        let mut c = connect_from(from, splicer.listen)?;
        c.write_all(&first(i))?;
        conns.push(c);
    }
    let mut kept = 0;
    for mut c in conns {
        c.set_read_timeout(Some(Duration::from_millis(300)))?;
        let mut b = [0u8; 64];
        match c.read(&mut b) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => kept += 1,
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => anyhow::bail!("unexpected answer: {other:?}"),
        }
    }
    Ok(kept)
}

/// A burst from one address is cut to its burst and then its rate; another
/// address is not affected; the cut connections are counted, and logged at
/// most once a second.
#[test]
fn a_burst_from_one_address_is_cut_at_the_configured_rate() -> Result<()> {
    let dir = scratch("mqtt-aware-rate");
    let up = sinks(1)?[0];
    let metrics = metrics_addr();
    let m_arg = metrics.to_string();
    let splicer = mqtt_splicer(
        &dir,
        "userspace",
        up,
        &["--rate-limit", "5/s", "--rate-limit-burst", "5", "--metrics", &m_arg],
    )?;
    let connect = |i: usize| Connect::new(4, &format!("storm-{i}")).bytes();
    let first = admitted(&splicer, CLIENT_IP, 20, connect)?;
    ensure!((5..=6).contains(&first), "burst of 20: {first} admitted, want the burst of 5");
    let other = admitted(&splicer, Ipv4Addr::new(127, 0, 0, 6), 2, connect)?;
    ensure!(other == 2, "another address was limited too ({other} of 2)");
    thread::sleep(Duration::from_secs(1));
    let later = admitted(&splicer, CLIENT_IP, 10, connect)?;
    ensure!((4..=7).contains(&later), "a second later: {later} of 10 admitted, want about 5 (5/s)");
    let cut = (20 - first) + (10 - later);
    expect_metrics(
        metrics,
        &[("splicer_rejections_total{listener=\"default\",reason=\"rate_limited\"}", cut as f64)],
    )?;
    let lines = splicer.proc.lines_with("over rate-limit for 127.0.0.2/32");
    ensure!((1..=3).contains(&lines.len()), "{} lines for {cut} cut connections:\n{}", lines.len(), lines.join("\n"));
    Ok(())
}

/// Behind a trusted proxy the limits apply to the real client the PROXY
/// header names, not to the proxy; `max-connect-rate` caps everyone.
#[test]
fn rate_limits_apply_to_the_real_client_behind_a_proxy() -> Result<()> {
    let dir = scratch("mqtt-aware-rate-proxy");
    let up = sinks(1)?[0];
    let proxied = ["--accept-proxy", "v1", "--trusted-proxy", "127.0.0.2/32"];
    std::fs::create_dir_all(dir.join("source"))?;
    std::fs::create_dir_all(dir.join("listener"))?;
    let splicer = mqtt_splicer(&dir.join("source"), "userspace", up, &[&proxied[..], &["--rate-limit", "3/m", "--rate-limit-burst", "3"]].concat())?;
    let from = |src: &'static str| {
        move |i: usize| {
            let mut b = format!("PROXY TCP4 {src} 127.0.0.3 4000{i} 1883\r\n").into_bytes();
            b.extend(Connect::new(4, &format!("behind-{i}")).bytes());
            b
        }
    };
    let a = admitted(&splicer, CLIENT_IP, 8, from("10.9.0.1"))?;
    let b = admitted(&splicer, CLIENT_IP, 2, from("10.9.0.2"))?;
    ensure!((a, b) == (3, 2), "10.9.0.1: {a} of 8 admitted (want 3); 10.9.0.2: {b} of 2 (want 2)");
    let everyone = mqtt_splicer(&dir.join("listener"), "userspace", up, &[&proxied[..], &["--max-connect-rate", "4/s"]].concat())?;
    let spread = |i: usize| from(["10.8.0.1", "10.8.0.2", "10.8.0.3", "10.8.0.4", "10.8.0.5", "10.8.0.6"][i % 6])(i);
    let n = admitted(&everyone, CLIENT_IP, 12, spread)?;
    ensure!((4..=5).contains(&n), "max-connect-rate 4/s let {n} of 12 in");
    wait_lines(&everyone.proc, "over max-connect-rate", 1)?;
    Ok(())
}

// ------------------------------------------------ MQTT over WebSocket

const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A fake broker's side of the upgrade: reads the request, answers 101.
fn switch(up: &mut std::net::TcpStream) -> Result<Vec<u8>> {
    let (head, rest) = read_head(up)?;
    ensure!(rest.is_empty(), "client bytes before the 101: {}", show(&rest));
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n",
        ws::accept(WS_KEY)
    );
    up.write_all(answer.as_bytes())?;
    Ok(head)
}

/// A client's upgrade through `splicer`, offering permessage-deflate;
/// returns the client, once it has the 101, and the fake broker's side.
fn upgraded(splicer: &Splicer, broker: &TcpListener) -> Result<(std::net::TcpStream, std::net::TcpStream, Vec<u8>)> {
    let mut c = connect_from(CLIENT_IP, splicer.listen)?;
    c.write_all(&upgrade_request(splicer.listen, "/mqtt", WS_KEY, &["Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"]))?;
    let mut up = accept_within(broker, STEP)?.context("splicer never connected upstream")?;
    up.set_read_timeout(Some(STEP))?;
    let head = switch(&mut up)?;
    let (answer, rest) = read_head(&mut c)?;
    ensure!(answer.starts_with(b"HTTP/1.1 101 ") && rest.is_empty(), "client got {}", show(&answer));
    Ok((c, up, head))
}

/// `protocol = "mqtt-ws"`: no extension reaches the broker (the frames
/// must stay readable); the CONNECT, fragmented over frames with a ping
/// between, is read after the 101 and every frame byte reaches the broker
/// as the client sent it; the close line names the client.
#[test]
fn mqtt_ws_reads_the_connect_from_the_frames_and_forwards_them_unchanged() -> Result<()> {
    for mode in MODES {
        let dir = scratch(&format!("mqtt-aware-ws-{mode}"));
        let (broker, broker_addr) = listen_on(BROKER_IP)?;
        let splicer = splicer_in_mode(&dir, mode, broker_addr, &["--protocol", "mqtt-ws"])?;
        let (mut c, mut up, head) = upgraded(&splicer, &broker)?;
        ensure!(
            header_values(&head, "Sec-WebSocket-Extensions").is_empty(),
            "an extension offer reached the broker:\n{}",
            String::from_utf8_lossy(&head)
        );
        let connect = Connect { username: Some("dave"), keepalive: 30, ..Connect::new(5, "ws-client") }.bytes();
        let mask = Some([9, 8, 7, 6]);
        let mut first = ws::frame(ws::BINARY, &connect[..7], mask);
        first[0] &= 0x7f; // not final: continued below
        let frames = [
            first,
            ws::frame(0x9, b"ping", mask),
            ws::frame(0x0, &connect[7..], mask), // the final continuation
            ws::frame(ws::BINARY, &mqtt::packet(0x30, b"\x00\x01tx"), mask),
        ]
        .concat();
        c.set_nodelay(true)?;
        for piece in frames.chunks(5) {
            c.write_all(piece)?;
            thread::sleep(Duration::from_millis(2));
        }
        let mut got = vec![0u8; frames.len()];
        up.read_exact(&mut got)?;
        ensure!(got == frames, "{mode}: the broker got {}\nwant {}", show(&got), show(&frames));
        let connack = ws::frame(ws::BINARY, &[0x20, 0x03, 0x00, 0x00, 0x00], None);
        up.write_all(&connack)?;
        let mut back = vec![0u8; connack.len()];
        c.read_exact(&mut back)?;
        ensure!(back == connack);
        drop(c);
        drop(up);
        let line = splicer.wait_closed(1, STEP)?.remove(0);
        ensure!(
            quoted(&line, "client_id") == Some("ws-client")
                && quoted(&line, "username") == Some("dave")
                && close_field(&line, "mqtt_version") == Some("5.0"),
            "{mode}: {line}"
        );
    }
    Ok(())
}

/// Over WebSocket, what is not a CONNECT gets the CONNACK a broker would
/// send (in a binary frame) and a Close frame; a client that stops half way
/// through its frame and half-closes is closed; a silent client is cut at
/// the timeout. No frame byte reaches the broker, which sees its
/// connection close.
#[test]
fn mqtt_ws_refuses_what_is_not_a_connect() -> Result<()> {
    let dir = scratch("mqtt-aware-ws-refusals");
    let (broker, broker_addr) = listen_on(BROKER_IP)?;
    let metrics = metrics_addr();
    let m_arg = metrics.to_string();
    let splicer = splicer_in_mode(
        &dir,
        "sockmap",
        broker_addr,
        &["--protocol", "mqtt-ws", "--mqtt-connect-timeout", "1s", "--metrics", &m_arg],
    )?;
    let mask = Some([1, 2, 3, 4]);
    let mut reserved = Connect::new(5, "x").bytes();
    reserved[9] |= 1;
    let close_1002 = [0x88, 0x02, 0x03, 0xea];
    let half_a_frame = ws::frame(ws::BINARY, &Connect::new(4, "cut").bytes(), mask)[..9].to_vec();
    let cases: [(&str, Vec<u8>, Vec<u8>); 5] = [
        ("a text frame", ws::frame(0x1, b"hello", mask), close_1002.to_vec()),
        ("half a CONNECT frame, then FIN", half_a_frame, Vec::new()),
        ("a CONNECT with a reserved flag", ws::frame(ws::BINARY, &reserved, mask), [&[0x82, 0x05, 0x20, 0x03, 0x00, 0x81, 0x00][..], &close_1002].concat()),
        ("an unmasked frame", ws::frame(ws::BINARY, &Connect::new(4, "x").bytes(), None), close_1002.to_vec()),
        ("nothing", Vec::new(), Vec::new()),
    ];
    for (what, sent, want) in &cases {
        let (mut c, mut up, _) = upgraded(&splicer, &broker)?;
        c.write_all(sent)?;
        if what.ends_with("FIN") {
            c.shutdown(Shutdown::Write)?;
        }
        let got = read_to_end_timeout(&mut c, STEP).with_context(|| *what)?;
        ensure!(&got == want, "{what}: the client got {}, want {}", show(&got), show(want));
        let at_broker = read_to_end_timeout(&mut up, STEP).unwrap_or_default();
        ensure!(at_broker.is_empty(), "{what}: the broker got {}", show(&at_broker));
    }
    expect_metrics(
        metrics,
        &[
            ("splicer_mqtt_connect_rejections_total{listener=\"default\",reason=\"not_connect\"}", 1.0),
            ("splicer_mqtt_connect_rejections_total{listener=\"default\",reason=\"malformed\"}", 2.0),
            ("splicer_mqtt_connect_rejections_total{listener=\"default\",reason=\"timeout\"}", 1.0),
            ("splicer_mqtt_connect_rejections_total{listener=\"default\",reason=\"closed\"}", 1.0),
            ("splicer_rejections_total{listener=\"default\",reason=\"bad_mqtt_connect\"}", 5.0),
        ],
    )?;
    Ok(())
}

/// MQTT.js over WebSocket through `protocol = "mqtt-ws"`: a QoS 1 message
/// gets across, and the close lines name the clients: MQTT 3.1.1 to aedes,
/// and MQTT 5 to mosquitto's websockets listener.
#[test]
fn mqttjs_over_an_mqtt_ws_listener() -> Result<()> {
    for mode in MODES {
        let dir = scratch(&format!("mqtt-aware-mqttjs-ws-{mode}"));
        let (_aedes, aedes_addr) = start_aedes_ws(&dir)?;
        ws_roundtrip(&dir.join("aedes"), mode, aedes_addr, "4")?;
        let mdir = dir.join("mosquitto");
        std::fs::create_dir_all(&mdir)?;
        match start_mosquitto_ws(&mdir)? {
            Ok((_mosquitto, addr)) => ws_roundtrip(&mdir, mode, addr, "5")?,
            Err(why) => eprintln!("SKIPPED the mosquitto part: {why}"),
        }
    }
    Ok(())
}

/// One MQTT.js subscriber and one publisher of MQTT `version` through a
/// fresh `mqtt-ws` splicer to `broker`.
fn ws_roundtrip(dir: &std::path::Path, mode: &str, broker: SocketAddr, version: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let splicer = splicer_in_mode(dir, mode, broker, &["--protocol", "mqtt-ws"])?;
    let url = format!("ws://{}/mqtt", splicer.listen);
    let (sub_id, pub_id) = (format!("wsjs-sub-{mode}-{version}"), format!("wsjs-pub-{mode}-{version}"));
    let common = ["--mqtt-version", version, "--qos", "1"];
    let mut sub = Proc::spawn_apart(
        &sub_id,
        dir,
        &mut mqtt_client_cmd(&url, &sub_id, &[&common[..], &["--subscribe", "ws/t", "--count", "1", "--timeout-ms", "15000"]].concat()),
    )?;
    sub.wait_line("\"event\":\"subscribed\"", STEP)?;
    run_mqtt_client(&url, &pub_id, &[&common[..], &["--publish", "ws/t", "over-ws"]].concat(), STEP)?;
    ensure!(sub.wait_exit(STEP)?.success(), "subscriber: {}", sub.stderr());
    ensure!(
        sub.output().lines().any(|l| is_event(l, "message") && json_field(l, "payload").as_deref() == Some("over-ws")),
        "{mode} MQTT {version}: subscriber got\n{}",
        sub.output()
    );
    let want = if version == "5" { "5.0" } else { "3.1.1" };
    for id in [&sub_id, &pub_id] {
        let line = wait_lines(&splicer.proc, &format!("client_id=\"{id}\""), 1)?.remove(0);
        ensure!(line.contains("] closed ") && close_field(&line, "mqtt_version") == Some(want), "{mode}: {line}");
    }
    Ok(())
}
