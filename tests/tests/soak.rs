//! Soak (issue 11): honest MQTT clients over TCP and WebSocket next to
//! spoofing, half-open, slowloris and resetting ones, and clients of a
//! broker that is killed and restarted over and over, all at once, for a
//! bounded time. Every honest client's messages arrive, no spoofed address
//! reaches a broker, a client whose broker dies is closed (never left
//! hanging), and afterwards nothing is left over: no connection, fd or eBPF
//! map entry, and RSS is back within a small margin.
//!
//! Addresses: 127.0.0.2 clients, 127.0.0.3 splicer, 127.0.0.4 the aedes
//! brokers (which report the client address their PROXY / X-Forwarded-For
//! decoder found) and the mosquitto that restarts.
use std::{
    fs,
    io::{Read, Write},
    net::{Shutdown, SocketAddr},
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use splicer_testkit::ws;
use splicer_tests::*;

/// How long the mix runs.
const SOAK: Duration = Duration::from_secs(20);
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const SPOOF: &str = "6.6.6.6";

fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// MQTT 3.1.1 CONNECT for `id`: clean session, keep-alive 30 s.
fn connect_packet(id: &str) -> Vec<u8> {
    mqtt::Connect {
        keepalive: 30,
        ..mqtt::Connect::new(4, id)
    }
    .bytes()
}

/// Runs `work` in a loop until `until`, counting rounds; the first error
/// stops the loop and is returned.
fn keep_at(
    until: Instant,
    rounds: Arc<AtomicUsize>,
    mut work: impl FnMut(usize) -> Result<()> + Send + 'static,
) -> thread::JoinHandle<Result<()>> {
    thread::spawn(move || {
        while Instant::now() < until {
            let i = rounds.fetch_add(1, Relaxed);
            work(i).with_context(|| format!("round {i}"))?;
        }
        Ok(())
    })
}

/// An honest MQTT.js client: subscribes, publishes to itself at QoS 1 and
/// must get its message back.
fn honest(url: &str, id: &str) -> Result<()> {
    let topic = format!("soak/{id}");
    let out = run_mqtt_client(
        url,
        id,
        &["--subscribe", &topic, "--publish", &topic, id, "--qos", "1"],
        Duration::from_secs(20),
    )?;
    ensure!(
        out.lines().any(|l| is_event(l, "message") && json_field(l, "payload").as_deref() == Some(id)),
        "{id}: its message did not come back:\n{out}"
    );
    Ok(())
}

/// A TCP client that writes its own PROXY header claiming SPOOF, then a
/// CONNECT. splicer's listener takes no PROXY header, so the broker gets
/// splicer's (naming 127.0.0.2) and then this one as bytes of the stream.
fn spoof_tcp(to: SocketAddr, i: usize) -> Result<()> {
    let mut c = connect_from(CLIENT_IP, to)?;
    let mut bytes = format!("PROXY TCP4 {SPOOF} 10.0.0.1 4444 1883\r\n").into_bytes();
    bytes.extend(connect_packet(&format!("spoof-tcp-{i}")));
    c.write_all(&bytes)?;
    let _ = read_to_end_timeout(&mut c, Duration::from_millis(500));
    Ok(())
}

/// A WebSocket client that claims SPOOF in X-Forwarded-For and X-Real-IP,
/// then connects over MQTT and must get its CONNACK.
fn spoof_ws(to: SocketAddr, i: usize) -> Result<()> {
    let mut c = connect_from(CLIENT_IP, to)?;
    c.set_read_timeout(Some(STEP))?;
    let forged = [format!("X-Forwarded-For: {SPOOF}"), format!("X-Real-IP: {SPOOF}")];
    let forged: Vec<&str> = forged.iter().map(String::as_str).collect();
    c.write_all(&upgrade_request(to, "/mqtt", WS_KEY, &forged))?;
    let (head, mut early) = read_head(&mut c)?;
    ensure!(first_line(&head) == "HTTP/1.1 101 Switching Protocols", "spoof-ws-{i}: {}", show(&head));
    c.write_all(&ws::frame(ws::BINARY, &connect_packet(&format!("spoof-ws-{i}")), Some([1, 2, 3, 4])))?;
    // The CONNACK's 4 bytes, over however many (small, unmasked) frames
    // the broker wrote them in.
    let mut mqtt = Vec::new();
    let mut buf = [0u8; 64];
    while mqtt.len() < 4 {
        while let [_, len, ..] = early[..] {
            let end = 2 + usize::from(len & 0x7f);
            if early.len() < end {
                break;
            }
            mqtt.extend_from_slice(&early[2..end]);
            early.drain(..end);
        }
        if mqtt.len() >= 4 {
            break;
        }
        let n = c.read(&mut buf)?;
        ensure!(n > 0, "spoof-ws-{i}: closed before its CONNACK");
        early.extend_from_slice(&buf[..n]);
    }
    ensure!(mqtt[0] == 0x20 && mqtt[3] == 0, "spoof-ws-{i}: not an accepted CONNACK: {}", show(&mqtt));
    Ok(())
}

/// The rude: a partial upgrade that half-closes, one that stalls until
/// the header timeout, one that resets, and an MQTT client that resets
/// half way through its CONNECT.
fn rude(tcp: SocketAddr, ws_listener: SocketAddr, i: usize) -> Result<()> {
    let partial = b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgr";
    match i % 4 {
        0 => {
            let mut c = connect_from(CLIENT_IP, ws_listener)?;
            c.write_all(partial)?;
            c.shutdown(Shutdown::Write)?;
            let _ = read_to_end_timeout(&mut c, STEP);
        }
        1 => {
            // Slowloris: held open; splicer closes it at ws-header-timeout.
            let mut c = connect_from(CLIENT_IP, ws_listener)?;
            c.write_all(partial)?;
            thread::spawn(move || read_to_end_timeout(&mut c, STEP));
        }
        2 => {
            let c = connect_from(CLIENT_IP, ws_listener)?;
            (&c).write_all(partial)?;
            socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO))?;
        }
        _ => {
            let c = connect_from(CLIENT_IP, tcp)?;
            (&c).write_all(&connect_packet("rude")[..7])?;
            thread::sleep(Duration::from_millis(20));
            socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO))?;
        }
    }
    thread::sleep(Duration::from_millis(10));
    Ok(())
}

/// A client of the broker that restarts: CONNECT, then PINGREQs for up to
/// a second. While the broker is up every ping is answered; when it is
/// down or dies, splicer closes the connection. A read that times out
/// (STEP) is the failure this looks for: a client left hanging.
fn through_restarts(to: SocketAddr, i: usize) -> Result<()> {
    let mut c = connect_from(CLIENT_IP, to)?;
    c.write_all(&connect_packet(&format!("restart-{i}")))?;
    let mut ack = [0u8; 4];
    match c.read_exact(&mut ack) {
        Ok(()) => ensure!(ack == [0x20, 2, 0, 0], "restart-{i}: not a CONNACK: {}", show(&ack)),
        Err(e) if gone(&e) => return Ok(()),
        Err(e) => return Err(e).context(format!("restart-{i}: waiting for the CONNACK")),
    }
    for _ in 0..10 {
        thread::sleep(Duration::from_millis(100));
        let mut pong = [0u8; 2];
        match c.write_all(&[0xc0, 0]).and_then(|()| c.read_exact(&mut pong)) {
            Ok(()) => ensure!(pong == [0xd0, 0], "restart-{i}: not a PINGRESP: {}", show(&pong)),
            Err(e) if gone(&e) => return Ok(()),
            Err(e) => return Err(e).context(format!("restart-{i}: waiting for a PINGRESP")),
        }
    }
    Ok(())
}

/// The connection was closed or reset (its broker died), as opposed to
/// left hanging (a timeout).
fn gone(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), UnexpectedEof | ConnectionReset | BrokenPipe | ConnectionAborted)
}

/// Kills the broker every 1.5 s and starts it again on the same address
/// 300 ms later, until `until`; returns the last one and the restart count.
fn restarter(dir: std::path::PathBuf, addr: SocketAddr, until: Instant) -> thread::JoinHandle<Result<(Proc, usize)>> {
    thread::spawn(move || {
        let mut broker = start_mosquitto(&dir.join("mosquitto-0"), addr)?;
        let mut n = 0;
        while Instant::now() + Duration::from_secs(2) < until {
            thread::sleep(Duration::from_millis(1500));
            broker.stop();
            thread::sleep(Duration::from_millis(300));
            n += 1;
            broker = start_mosquitto(&dir.join(format!("mosquitto-{n}")), addr)?;
        }
        Ok((broker, n))
    })
}

#[test]
fn soak_mixed_clients_leave_nothing_behind() -> Result<()> {
    let dir = scratch("soak");
    let (mut tcp_broker, tcp_broker_addr) = start_aedes(&subdir(&dir, "aedes-tcp")?)?;
    let (mut ws_broker, ws_broker_addr) = start_aedes_ws(&subdir(&dir, "aedes-ws")?)?;
    let tcp = v4(SPLICER_IP, free_port(SPLICER_IP));
    let wsl = v4(SPLICER_IP, free_port(SPLICER_IP));
    let rl = v4(SPLICER_IP, free_port(SPLICER_IP));
    let restarting = v4(BROKER_IP, free_port(BROKER_IP));
    let maddr = metrics_addr();
    let config = dir.join("splicer.toml");
    fs::write(
        &config,
        format!(
            "offload = \"sockmap\"\nmetrics = \"{maddr}\"\n\
             [[listener]]\nname = \"tcp\"\nlisten = \"{tcp}\"\nupstream = [\"{tcp_broker_addr}\"]\nsend-proxy = \"v2\"\n\
             [[listener]]\nname = \"ws\"\nlisten = \"{wsl}\"\nupstream = [\"{ws_broker_addr}\"]\nprotocol = \"ws\"\n\
             ws-header-timeout = \"1s\"\nmax-handshakes = 256\n\
             [[listener]]\nname = \"restart\"\nlisten = \"{rl}\"\nupstream = [\"{restarting}\"]\nconnect-timeout = \"1s\"\n"
        ),
    )?;
    let mut cmd = Command::new(splicer_bin());
    cmd.arg("--config").arg(&config);
    let mut splicer = Splicer::start_cmd(&dir, cmd, tcp)?;
    splicer.proc.wait_listening(wsl, STEP)?;
    let pid = splicer.proc.pid();
    let (fds_before, rss_before) = (splicer.proc.fd_count(), rss_kib(pid));

    let until = Instant::now() + SOAK;
    let restarts = restarter(dir.clone(), restarting, until);
    // The first broker is up before its clients start.
    wait_until_listening(restarting)?;
    let counts: Vec<Arc<AtomicUsize>> = (0..6).map(|_| Arc::default()).collect();
    let tcp_url = format!("mqtt://{tcp}");
    let ws_url = format!("ws://{wsl}/mqtt");
    let workers = vec![
        keep_at(until, counts[0].clone(), move |i| honest(&tcp_url, &format!("honest-tcp-{i}"))),
        keep_at(until, counts[1].clone(), move |i| honest(&ws_url, &format!("honest-ws-{i}"))),
        keep_at(until, counts[2].clone(), move |i| spoof_tcp(tcp, i)),
        keep_at(until, counts[3].clone(), move |i| spoof_ws(wsl, i)),
        keep_at(until, counts[4].clone(), move |i| rude(tcp, wsl, i)),
        keep_at(until, counts[5].clone(), move |i| through_restarts(rl, i)),
    ];
    for w in workers {
        w.join().expect("worker thread")?;
    }
    let (_broker, restarted) = restarts.join().expect("restarter thread")?;
    let n: Vec<usize> = counts.iter().map(|c| c.load(Relaxed)).collect();
    eprintln!(
        "soak: honest tcp {} ws {}, spoofing tcp {} ws {}, rude {}, through {restarted} broker restarts {}",
        n[0], n[1], n[2], n[3], n[4], n[5]
    );
    ensure!(n.iter().all(|&k| k >= 5), "too few rounds for a soak: {n:?}");
    ensure!(restarted >= 5, "the broker restarted only {restarted} times");
    // After the last restart, its listener still works.
    let mut c = connect_from(CLIENT_IP, rl)?;
    c.write_all(&connect_packet("after-restarts"))?;
    let mut ack = [0u8; 4];
    c.read_exact(&mut ack).context("no CONNACK after the last restart")?;
    ensure!(ack == [0x20, 2, 0, 0], "after the restarts: not a CONNACK: {}", show(&ack));
    drop(c);

    // No spoofed address reached either broker; spoofing WebSocket clients
    // were seen as themselves.
    for (name, broker) in [("tcp", &tcp_broker), ("ws", &ws_broker)] {
        ensure!(!broker.output().contains(SPOOF), "the {name} broker saw {SPOOF}:\n{}", broker.output());
    }
    let seen = aedes_client(&mut ws_broker, "spoof-ws-0")?;
    ensure!(json_field(&seen, "ip").as_deref() == Some("127.0.0.2"), "spoof-ws-0 seen as {seen}");
    let seen = aedes_client(&mut tcp_broker, "honest-tcp-0")?;
    ensure!(json_field(&seen, "ip").as_deref() == Some("127.0.0.2"), "honest-tcp-0 seen as {seen}");

    // Everything closes; nothing is left.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = splicer_testkit::metrics::scrape(maddr, STEP)?;
        let active = metric(&text, r#"splicer_connections_active{listener="tcp"}"#)?
            + metric(&text, r#"splicer_connections_active{listener="ws"}"#)?
            + metric(&text, r#"splicer_connections_active{listener="restart"}"#)?;
        if active == 0.0 {
            break;
        }
        ensure!(Instant::now() < deadline, "{active} connections still open after the soak:\n{text}");
        thread::sleep(Duration::from_millis(100));
    }
    let fds_after = splicer.proc.fd_count();
    ensure!(fds_after == fds_before, "{fds_before} fds before the soak, {fds_after} after");
    for map in ["LINKS", "TARGETS", "SPLICED", "LIMITS"] {
        let left = bpf_map_entries(pid, map)?;
        ensure!(left == 0, "{map} has {left} entries after the soak");
    }
    // splicer hands freed heap back every 5 s after connections came and went.
    thread::sleep(Duration::from_secs(6));
    let rss_after = rss_kib(pid);
    eprintln!("soak: RSS {rss_before} KiB before, {rss_after} KiB after");
    ensure!(rss_after <= rss_before + 8 * 1024, "RSS {rss_before} KiB before the soak, {rss_after} KiB after");
    Ok(())
}

fn wait_until_listening(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + STEP;
    while !is_listening(addr) {
        ensure!(Instant::now() < deadline, "nothing listens on {addr}");
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A folder of its own under `dir` (two aedes in one folder would share
/// their log).
fn subdir(dir: &std::path::Path, name: &str) -> Result<std::path::PathBuf> {
    let d = dir.join(name);
    fs::create_dir_all(&d)?;
    Ok(d)
}
