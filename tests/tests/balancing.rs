//! Balancing and upstream health (issue: per-listener `balance`, weights,
//! active and passive health checks, SIGHUP reload, upstream metrics).
//!
//! splicer runs from a TOML file written to the scratch directory
//! (`--config`), listener "mqtt" on 127.0.0.3, with the sockmap offload.
//! Upstreams are real mosquitto / aedes brokers, or "sinks": listeners in
//! this test on 127.0.0.4 that answer a connection's first bytes with their
//! own one-byte id followed by those bytes, and echo the rest until EOF. A
//! connection that sends nothing (a TCP health check) gets nothing and is
//! counted apart, so the sinks also say how many checks reached them.
//!
//! Which upstream served a client is read twice, independently: the id
//! byte the client got back, and the `upstream=` of splicer's close line.
use std::{
    fs,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use splicer_testkit::metrics::scrape;
use splicer_tests::*;

const NAME: &str = "mqtt";

// ---------------------------------------------------------------- sinks

/// A test upstream: see the module comment. Stopping it closes its
/// listening socket, so later connects are refused.
struct Sink {
    id: u8,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Connections that sent data (clients).
    served: Arc<AtomicUsize>,
    /// Connections closed without sending anything (TCP health checks).
    empty: Arc<AtomicUsize>,
    accept: Option<thread::JoinHandle<()>>,
}

impl Sink {
    fn start(id: u8) -> Result<Sink> {
        let (l, _) = listen_on(BROKER_IP)?;
        Self::serve(id, l)
    }

    /// A sink on a given address (one a stopped sink had).
    fn start_on(id: u8, addr: SocketAddr) -> Result<Sink> {
        Self::serve(id, std::net::TcpListener::bind(addr)?)
    }

    fn serve(id: u8, l: std::net::TcpListener) -> Result<Sink> {
        let addr = l.local_addr()?;
        l.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let empty = Arc::new(AtomicUsize::new(0));
        let accept = {
            let (stop, served, empty) = (stop.clone(), served.clone(), empty.clone());
            thread::spawn(move || {
                while !stop.load(SeqCst) {
                    match l.accept() {
                        Ok((s, _)) => {
                            let (served, empty) = (served.clone(), empty.clone());
                            thread::spawn(move || serve_sink_conn(id, s, &served, &empty));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(5))
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
                // `l` is dropped here: the port refuses connects from now on.
            })
        };
        Ok(Sink {
            id,
            addr,
            stop,
            served,
            empty,
            accept: Some(accept),
        })
    }

    fn served(&self) -> usize {
        self.served.load(SeqCst)
    }

    fn empty(&self) -> usize {
        self.empty.load(SeqCst)
    }

    /// Closes the listening socket (and waits until it is closed).
    fn stop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_sink_conn(id: u8, mut s: TcpStream, served: &AtomicUsize, empty: &AtomicUsize) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
    let mut buf = [0u8; 4096];
    let n = match s.read(&mut buf) {
        Ok(n) if n > 0 => n,
        _ => {
            empty.fetch_add(1, SeqCst);
            return;
        }
    };
    served.fetch_add(1, SeqCst);
    let mut first = vec![id];
    first.extend_from_slice(&buf[..n]);
    if s.write_all(&first).is_err() {
        return;
    }
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

fn sink_by_id(sinks: &[&Sink], id: u8) -> Result<SocketAddr> {
    sinks
        .iter()
        .find(|s| s.id == id)
        .map(|s| s.addr)
        .with_context(|| format!("no sink has id {:?}", id as char))
}

// -------------------------------------------------------------- clients

/// Connects from `from` through splicer and says hello; returns the open
/// connection and the id of the sink that answered (its echo checked).
fn hello(from: Ipv4Addr, to: SocketAddr) -> Result<(TcpStream, u8)> {
    let mut c = connect_from(from, to)?;
    let msg = format!("hello from {}", local(&c)).into_bytes();
    c.write_all(&msg)?;
    let mut back = vec![0u8; msg.len() + 1];
    c.read_exact(&mut back)
        .with_context(|| format!("client {}: no answer through splicer", local(&c)))?;
    ensure!(
        back[1..] == msg[..],
        "client {}: echo {:?} is not what was sent",
        local(&c),
        show(&back)
    );
    Ok((c, back[0]))
}

/// Half-closes a client, expects a clean EOF back, and returns splicer's
/// close line for it, checked to name the upstream `want` (the sink whose
/// id the client got).
fn finish(s: &Splicer, mut c: TcpStream, want: SocketAddr) -> Result<String> {
    let client = local(&c);
    c.shutdown(Shutdown::Write)?;
    let rest = read_to_end_timeout(&mut c, STEP)?;
    ensure!(
        rest.is_empty(),
        "client {client} got {} extra bytes",
        rest.len()
    );
    let line = s.close_line_for(client, STEP)?;
    ensure!(
        close_field(&line, "upstream") == Some(want.to_string().as_str()),
        "the sink at {want} answered client {client}, but splicer's close line says: {line}"
    );
    Ok(line)
}

/// One short connection from `from`; returns the id of the sink that
/// served it (checked against the close line).
fn one(s: &Splicer, from: Ipv4Addr, sinks: &[&Sink]) -> Result<u8> {
    let (c, id) = hello(from, s.listen)?;
    finish(s, c, sink_by_id(sinks, id)?)?;
    Ok(id)
}

fn ids(seq: &[u8]) -> String {
    seq.iter().map(|&b| b as char).collect()
}

// -------------------------------------------------------------- splicer

/// A config with one listener "mqtt" on `listen`; `keys` are extra listener
/// keys (balance, health-check, ...).
fn config(
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
    upstreams: &[String],
    keys: &str,
) -> String {
    let ups: Vec<String> = upstreams.iter().map(|u| format!("\"{u}\"")).collect();
    let metrics = metrics.map_or(String::new(), |m| format!("metrics = \"{m}\"\n"));
    format!(
        "log-level = \"info\"\noffload = \"sockmap\"\n{metrics}\n\
         [[listener]]\nname = \"{NAME}\"\nlisten = \"{listen}\"\nupstream = [{}]\n{keys}\n",
        ups.join(", ")
    )
}

/// Writes `text` to DIR/splicer.toml and starts `splicer --config` on it;
/// checks that the sockmap offload is in effect.
fn start_splicer(dir: &Path, listen: SocketAddr, text: &str) -> Result<(Splicer, PathBuf)> {
    let path = dir.join("splicer.toml");
    fs::write(&path, text)?;
    let mut cmd = Command::new(splicer_bin());
    cmd.arg("--config").arg(&path);
    let s = Splicer::start_cmd(dir, cmd, listen)?;
    ensure!(
        s.offload() == "sockmap",
        "offload {:?}, want sockmap:\n{}",
        s.offload(),
        s.proc.output()
    );
    eprintln!("config:\n{text}");
    Ok((s, path))
}

fn splicer_addr() -> SocketAddr {
    v4(SPLICER_IP, free_port(SPLICER_IP))
}

/// The value of `family{listener="mqtt",upstream="ADDR"}` in a scrape.
fn upstream_metric(metrics: SocketAddr, family: &str, upstream: SocketAddr) -> Result<f64> {
    let body = scrape(metrics, STEP)?;
    let (l, u) = (
        format!("listener=\"{NAME}\""),
        format!("upstream=\"{upstream}\""),
    );
    let line = body
        .lines()
        .find(|line| {
            line.starts_with(&format!("{family}{{")) && line.contains(&l) && line.contains(&u)
        })
        .with_context(|| format!("no {family} for {upstream} in:\n{body}"))?;
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no value in {line:?}"))
}

fn upstream_up(metrics: SocketAddr, upstream: SocketAddr) -> Result<f64> {
    upstream_metric(metrics, "splicer_upstream_up", upstream)
}

fn down_line(up: SocketAddr) -> String {
    format!("[{NAME}] upstream {up} is DOWN (")
}

fn up_line(up: SocketAddr) -> String {
    format!("[{NAME}] upstream {up} is UP (")
}

fn connect_failed(up: SocketAddr) -> String {
    format!("[{NAME}] upstream {up}: connect failed")
}


// ------------------------------------------ 1. active MQTT health checks

/// One publish through splicer as client `balancing-N`; its close line.
fn publish(s: &Splicer, n: usize) -> Result<String> {
    mosquitto_publish(s, &format!("balancing-{n}"), "t/balancing")
}

fn upstreams_of(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| close_field(l, "upstream").unwrap_or("?").to_string())
        .collect()
}

/// Two mosquitto brokers behind splicer with `health-check = "mqtt"`
/// (300 ms, rise 2, fall 2). Publishes alternate between them; once
/// broker 1 is killed, the checks take it DOWN within fall × interval (plus
/// slack) without any client paying for it (no client connect to it
/// fails), every publish goes to broker 2 and upstream_up says 0. Started
/// again on the same port, it comes back UP after `rise` good checks and
/// takes its share again.
#[test]
fn active_mqtt_checks_route_around_a_dead_broker() -> Result<()> {
    let dir = scratch("balancing-active");
    let b1 = v4(BROKER_IP, free_port(BROKER_IP));
    let b2 = v4(BROKER_IP, free_port(BROKER_IP));
    let mut broker1 = start_mosquitto(&dir.join("b1"), b1)?;
    let _broker2 = start_mosquitto(&dir.join("b2"), b2)?;
    let interval = Duration::from_millis(300);
    let fall = 2;
    let listen = splicer_addr();
    let metrics = splicer_addr();
    let (mut s, _) = start_splicer(
        &dir,
        listen,
        &config(
            listen,
            Some(metrics),
            &[b1.to_string(), b2.to_string()],
            &format!(
                "health-check = \"mqtt\"\nhealth-interval = \"{}ms\"\nhealth-rise = 2\nhealth-fall = {fall}\n",
                interval.as_millis()
            ),
        ),
    )?;
    let (b1s, b2s) = (b1.to_string(), b2.to_string());

    // Both up: publishes alternate.
    ensure!(upstream_up(metrics, b1)? == 1.0 && upstream_up(metrics, b2)? == 1.0);
    let lines = (0..4).map(|n| publish(&s, n)).collect::<Result<Vec<_>>>()?;
    let ups = upstreams_of(&lines);
    ensure!(
        ups.windows(2).all(|w| w[0] != w[1]) && ups.contains(&b1s) && ups.contains(&b2s),
        "publishes should alternate between {b1} and {b2}: {ups:?}"
    );

    // Broker 1 dies: the active checks take it down, no client involved.
    broker1.stop();
    let killed = Instant::now();
    let bound = interval * fall + Duration::from_secs(3);
    let down = s.proc.wait_line(&down_line(b1), bound)?;
    eprintln!("after {:?}: {down}", killed.elapsed());
    ensure!(
        down.contains(&format!("({fall} failures in a row, last: ")),
        "DOWN should follow {fall} failed checks: {down}"
    );
    ensure!(
        upstream_up(metrics, b1)? == 0.0,
        "upstream_up for {b1} should be 0"
    );
    ensure!(
        upstream_up(metrics, b2)? == 1.0,
        "upstream_up for {b2} should be 1"
    );
    let lines = (4..8).map(|n| publish(&s, n)).collect::<Result<Vec<_>>>()?;
    let ups = upstreams_of(&lines);
    ensure!(
        ups.iter().all(|u| *u == b2s),
        "with {b1} down every publish should go to {b2}: {ups:?}"
    );
    // Health checks don't log per failure; a client connect would. None
    // was made to the dead broker, before or after the DOWN line.
    ensure!(
        s.proc.lines_with(&connect_failed(b1)).is_empty(),
        "a client was sent to the dead broker:\n{}",
        s.proc.output()
    );
    ensure!(
        s.proc.lines_with(&up_line(b1)).is_empty(),
        "{b1} came back UP while dead"
    );

    // Broker 1 again, same port: UP after rise good checks.
    let _broker1 = start_mosquitto(&dir.join("b1-again"), b1)?;
    let up = s.proc.wait_line(&up_line(b1), STEP)?;
    ensure!(
        up.contains("(2 good checks)"),
        "UP should follow 2 good checks: {up}"
    );
    ensure!(
        upstream_up(metrics, b1)? == 1.0,
        "upstream_up for {b1} should be 1 again"
    );
    let lines = (8..12)
        .map(|n| publish(&s, n))
        .collect::<Result<Vec<_>>>()?;
    let ups = upstreams_of(&lines);
    ensure!(
        ups.windows(2).all(|w| w[0] != w[1]) && ups.contains(&b1s) && ups.contains(&b2s),
        "after UP, publishes should alternate again: {ups:?}"
    );
    ensure!(
        s.proc.lines_with("every upstream is down").is_empty()
            && s.proc.lines_with(&down_line(b2)).is_empty(),
        "unexpected:\n{}",
        s.proc.output()
    );
    Ok(())
}

// ------------------------------------------- 2. passive health checking

/// `health-check = "tcp"` with a 60 s interval: after the first check (at
/// start) only connects made for clients count. Sink A is stopped: every
/// client is still served (by B) end to end, the first failed connect
/// alone does not take A down (fall 2), the second does, and after that A
/// is never tried again: exactly 2 "connect failed" lines for it.
#[test]
fn passive_failures_take_an_upstream_down() -> Result<()> {
    let dir = scratch("balancing-passive");
    let mut a = Sink::start(b'A')?;
    let b = Sink::start(b'B')?;
    let listen = splicer_addr();
    let metrics = splicer_addr();
    let (s, _) = start_splicer(
        &dir,
        listen,
        &config(
            listen,
            Some(metrics),
            &[a.addr.to_string(), b.addr.to_string()],
            "health-check = \"tcp\"\nhealth-interval = \"60s\"\nhealth-rise = 2\nhealth-fall = 2\n",
        ),
    )?;
    // The first check of each sink happens at start: let it pass before A
    // goes, so that it cannot count as a failure.
    wait_for("a TCP check reaching both sinks", STEP, || {
        Ok(a.empty() >= 1 && b.empty() >= 1)
    })?;
    let (aa, ba) = (a.addr, b.addr);
    let mut before = Vec::new();
    for _ in 0..2 {
        before.push(one(&s, CLIENT_IP, &[&a, &b])?);
    }
    ensure!(
        ids(&before) == "AB" || ids(&before) == "BA",
        "both up: {}",
        ids(&before)
    );

    a.stop();
    let failed = || s.proc.lines_with(&connect_failed(aa)).len();
    let mut after = Vec::new();
    while failed() < 2 {
        ensure!(
            after.len() < 10,
            "10 clients after stopping A, but only {} failed connects to it:\n{}",
            failed(),
            s.proc.output()
        );
        // Every client still gets through, to B.
        after.push(one(&s, CLIENT_IP, &[&a, &b])?);
        if failed() == 1 {
            ensure!(
                s.proc.lines_with(&down_line(aa)).is_empty(),
                "one failure took {aa} down with fall 2:\n{}",
                s.proc.output()
            );
        }
    }
    let log = s.proc.output();
    let down_at = log
        .lines()
        .position(|l| l.contains(&down_line(aa)))
        .with_context(|| format!("no DOWN line for {aa} after 2 failed connects:\n{log}"))?;
    let down = log.lines().nth(down_at).unwrap();
    ensure!(
        down.contains("(2 failures in a row, last: connect failed"),
        "DOWN line: {down}"
    );
    ensure!(
        upstream_up(metrics, aa)? == 0.0,
        "upstream_up for {aa} should be 0"
    );
    for _ in 0..6 {
        after.push(one(&s, CLIENT_IP, &[&a, &b])?);
    }
    ensure!(
        after.iter().all(|&id| id == b'B'),
        "every client after A stopped should be served by B: {}",
        ids(&after)
    );
    let fails = s.proc.lines_with(&connect_failed(aa));
    ensure!(
        fails.len() == 2,
        "want exactly 2 failed connects to {aa} (fall 2), got:\n{}",
        fails.join("\n")
    );
    let log = s.proc.output();
    ensure!(
        log.lines()
            .skip(down_at + 1)
            .all(|l| !l.contains(&connect_failed(aa))),
        "{aa} was tried after it went DOWN:\n{log}"
    );
    ensure!(
        s.proc.lines_with(&connect_failed(ba)).is_empty()
            && s.proc.lines_with("every upstream is down").is_empty(),
        "unexpected failures:\n{log}"
    );
    ensure!(
        s.closed_lines().len() == 2 + after.len(),
        "every client should have a close line:\n{log}"
    );
    Ok(())
}

// ---------------------------------------- 3. smooth weighted round-robin

fn weighted_round_robin_in(mode: &str) -> Result<()> {
    let dir = scratch(&format!("balancing-wrr-{mode}"));
    let a = Sink::start(b'a')?;
    let b = Sink::start(b'b')?;
    let listen = splicer_addr();
    let mut text = config(
        listen,
        None,
        &[
            format!("{} weight=3", a.addr),
            format!("{} weight=1", b.addr),
        ],
        "balance = \"round-robin\"\n",
    );
    if mode != "sockmap" {
        text = text.replace("offload = \"sockmap\"", &format!("offload = \"{mode}\""));
    }
    let path = dir.join("splicer.toml");
    fs::write(&path, &text)?;
    let mut cmd = Command::new(splicer_bin());
    // Each test connection is short: only `now` hands it to the kernel.
    cmd.arg("--config").arg(&path).args(HANDOFF_NOW);
    let s = Splicer::start_cmd(&dir, cmd, listen)?;
    ensure!(
        s.offload() == mode,
        "offload {:?}, want {mode}",
        s.offload()
    );
    let seq = (0..8)
        .map(|_| one(&s, CLIENT_IP, &[&a, &b]))
        .collect::<Result<Vec<u8>>>()?;
    // nginx's smooth WRR for 3:1 (ties to the earlier upstream): a a b a.
    ensure!(
        ids(&seq) == "aabaaaba",
        "weights 3 and 1 gave {}, want aabaaaba",
        ids(&seq)
    );
    ensure!(
        (a.served(), b.served()) == (6, 2),
        "sinks served {} and {}, want 6 and 2",
        a.served(),
        b.served()
    );
    if mode == "sockmap" {
        check_kernel_bytes(&s.closed_lines(), mode, false)?;
    }
    Ok(())
}

/// Weights 3 and 1: 8 sequential clients go a a b a a a b a (6 and 2).
#[test]
fn weighted_round_robin_splits_exactly() -> Result<()> {
    for mode in MODES {
        weighted_round_robin_in(mode).with_context(|| format!("offload {mode}"))?;
    }
    Ok(())
}

// ------------------------------------------------------- 4. least-conn

/// `balance = "least-conn"`: with both idle, successive clients take turns;
/// with connections held, a new client goes to the upstream with fewer
/// live ones; closing connections is counted too.
#[test]
fn least_conn_prefers_the_idle_upstream() -> Result<()> {
    let dir = scratch("balancing-leastconn");
    let a = Sink::start(b'A')?;
    let b = Sink::start(b'B')?;
    let listen = splicer_addr();
    let (s, _) = start_splicer(
        &dir,
        listen,
        &config(
            listen,
            None,
            &[a.addr.to_string(), b.addr.to_string()],
            "balance = \"least-conn\"\n",
        ),
    )?;
    let sinks = [&a, &b];
    let other = |id: u8| if id == b'A' { b'B' } else { b'A' };

    // Idle each time: ties rotate.
    let seq = (0..4)
        .map(|_| one(&s, CLIENT_IP, &sinks))
        .collect::<Result<Vec<u8>>>()?;
    ensure!(
        seq.windows(2).all(|w| w[0] != w[1]),
        "idle upstreams should take turns: {}",
        ids(&seq)
    );

    // Held connections.
    let mut held: Vec<(TcpStream, u8)> = Vec::new();
    held.push(hello(CLIENT_IP, s.listen)?);
    let x = held[0].1;
    held.push(hello(CLIENT_IP, s.listen)?);
    ensure!(
        held[1].1 == other(x),
        "{} holds a connection and {} none, but the next went to {}",
        x as char,
        other(x) as char,
        held[1].1 as char
    );
    held.push(hello(CLIENT_IP, s.listen)?); // 1 and 1: either
    let z = held[2].1;
    held.push(hello(CLIENT_IP, s.listen)?);
    ensure!(
        held[3].1 == other(z),
        "{} holds 2 connections and {} 1, but the next went to {}",
        z as char,
        other(z) as char,
        held[3].1 as char
    );
    // Close W's two: now W 0, Z 2. The next two both go to W.
    let w = other(z);
    let (gone, kept): (Vec<_>, Vec<_>) = held.into_iter().partition(|(_, id)| *id == w);
    ensure!(gone.len() == 2 && kept.len() == 2);
    for (c, id) in gone {
        finish(&s, c, sink_by_id(&sinks, id)?)?;
    }
    let mut held = kept;
    for i in 0..2 {
        let (c, id) = hello(CLIENT_IP, s.listen)?;
        ensure!(
            id == w,
            "{} holds 2 connections and {} {i}, but the next went to {}",
            z as char,
            w as char,
            id as char
        );
        held.push((c, id));
    }
    for (c, id) in held {
        finish(&s, c, sink_by_id(&sinks, id)?)?;
    }
    ensure!(
        a.served() + b.served() == 10 && s.closed_lines().len() == 10,
        "10 clients: sinks served {} + {}, {} close lines",
        a.served(),
        b.served(),
        s.closed_lines().len()
    );
    Ok(())
}

// ---------------------------------------------------------- 5. source

/// `balance = "source"` with 3 sinks and 60 client addresses: each address
/// lands on the same sink every time; after a SIGHUP reload without sink 2,
/// the clients of sinks 1 and 3 stay exactly where they were and only sink
/// 2's move (to 1 or 3; sink 2, still running, gets none).
#[test]
fn source_hash_is_sticky_and_moves_only_the_removed_brokers_clients() -> Result<()> {
    let dir = scratch("balancing-source");
    let s1 = Sink::start(b'1')?;
    let s2 = Sink::start(b'2')?;
    let s3 = Sink::start(b'3')?;
    let sinks = [&s1, &s2, &s3];
    let listen = splicer_addr();
    let keys = "balance = \"source\"\n";
    let (s, path) = start_splicer(
        &dir,
        listen,
        &config(
            listen,
            None,
            &[
                s1.addr.to_string(),
                s2.addr.to_string(),
                s3.addr.to_string(),
            ],
            keys,
        ),
    )?;
    let clients: Vec<Ipv4Addr> = (10..70).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
    let mut first = Vec::new();
    for &ip in &clients {
        let id = one(&s, ip, &sinks)?;
        let again = one(&s, ip, &sinks)?;
        ensure!(
            id == again,
            "{ip} went to sink {} and then to sink {}",
            id as char,
            again as char
        );
        first.push(id);
    }
    eprintln!("sinks by client: {}", ids(&first));
    for sink in sinks {
        let n = first.iter().filter(|&&id| id == sink.id).count();
        // 60 clients hashed over 3: about 20 each. The sink ports change
        // from run to run, so this only checks that every sink has some
        // clients to move (the hash's fairness is a unit test with fixed
        // inputs); all 60 on two sinks has a chance of about 1e-10.
        ensure!(
            n >= 1,
            "sink {} got {n} of 60 clients: {}",
            sink.id as char,
            ids(&first)
        );
    }

    // Sink 2 leaves the config (it keeps running, so a client still sent
    // there would show).
    fs::write(
        &path,
        config(
            listen,
            None,
            &[s1.addr.to_string(), s3.addr.to_string()],
            keys,
        ),
    )?;
    ensure!(s.proc.signal(libc::SIGHUP));
    // "reload: FILE applied" or "reload refused, ...".
    wait_for("a reload result line", STEP, || {
        Ok(!s.proc.lines_with("reload: ").is_empty()
            || !s.proc.lines_with("reload refused").is_empty())
    })?;
    ensure!(
        !s.proc
            .lines_with(&format!("reload: {} applied", path.display()))
            .is_empty(),
        "reload not applied:\n{}",
        s.proc.output()
    );
    let served2 = s2.served();
    let mut moved = 0;
    for (&ip, &was) in clients.iter().zip(&first) {
        let now = one(&s, ip, &sinks)?;
        if was == b'2' {
            ensure!(now != b'2', "{ip} still went to the removed sink 2");
            moved += 1;
        } else {
            ensure!(
                now == was,
                "{ip} moved from sink {} to {} although its sink stayed",
                was as char,
                now as char
            );
        }
    }
    ensure!(
        moved >= 1 && s2.served() == served2,
        "sink 2 got clients after the reload"
    );
    ensure!(
        s.closed_lines().len() == 3 * clients.len(),
        "want {} close lines, got {}",
        3 * clients.len(),
        s.closed_lines().len()
    );
    Ok(())
}

// ------------------------------------- 6. MQTT checks with PROXY v2, aedes

/// aedes (with aedes-protocol-decoder) behind `send-proxy = "v2"` and
/// `health-check = "mqtt"`: the check sends a PROXY v2 LOCAL header, then
/// CONNECT; aedes must accept it, so the upstream stays UP with no failed
/// check, and clients still reach aedes with their own address.
#[test]
fn mqtt_check_with_proxy_v2_keeps_aedes_up() -> Result<()> {
    let dir = scratch("balancing-aedes");
    let (mut broker, broker_addr) = start_aedes(&dir)?;
    let listen = splicer_addr();
    let metrics = splicer_addr();
    let (s, _) = start_splicer(
        &dir,
        listen,
        &config(
            listen,
            Some(metrics),
            &[broker_addr.to_string()],
            "send-proxy = \"v2\"\nhealth-check = \"mqtt\"\nhealth-interval = \"300ms\"\n\
             health-rise = 2\nhealth-fall = 2\n",
        ),
    )?;
    let checks = |broker: &Proc| {
        broker
            .output()
            .lines()
            .filter(|l| {
                is_event(l, "client")
                    && json_field(l, "id").is_some_and(|id| id.starts_with("splicer-health-check-"))
            })
            .map(String::from)
            .collect::<Vec<_>>()
    };
    // Six checks accepted by aedes (at 300 ms: about 1.5 s).
    wait_for("6 health checks accepted by aedes", STEP, || {
        Ok(checks(&broker).len() >= 6)
    })
    .with_context(|| format!("aedes:\n{}\nsplicer:\n{}", broker.output(), s.proc.output()))?;
    let seen = checks(&broker);
    eprintln!("aedes saw the check as: {}", seen[0]);
    ensure!(
        seen.iter()
            .all(|l| json_field(l, "isProxy").as_deref() == Some("2")),
        "aedes should have decoded a v2 header on every check:\n{}",
        seen.join("\n")
    );
    let output = broker.output();
    ensure!(
        !output.contains("decode-error") && !output.contains("connection-error"),
        "aedes had errors:\n{output}"
    );
    ensure!(
        s.proc.lines_with(&down_line(broker_addr)).is_empty(),
        "aedes went DOWN:\n{}",
        s.proc.output()
    );
    ensure!(
        upstream_up(metrics, broker_addr)? == 1.0,
        "upstream_up should be 1"
    );
    let failures = upstream_metric(
        metrics,
        "splicer_upstream_connect_failures_total",
        broker_addr,
    )?;
    ensure!(failures == 0.0, "{failures} failed checks against aedes");

    // A client through the same listener: aedes sees its own address.
    let out = run_mqtt_client(
        &format!("mqtt://{listen}"),
        "balancing-aedes",
        &["--publish", "t/balancing", "balancing-aedes"],
        Duration::from_secs(20),
    )?;
    let connected = client_connected(&out, "balancing-aedes")?;
    let port = json_field(connected, "localPort").context("no localPort")?;
    let seen = aedes_client(&mut broker, "balancing-aedes")?;
    ensure!(
        json_field(&seen, "ip").as_deref() == Some("127.0.0.2")
            && json_field(&seen, "port").as_deref() == Some(port.as_str())
            && json_field(&seen, "isProxy").as_deref() == Some("2"),
        "aedes saw the client as: {seen}"
    );
    Ok(())
}

// ------------------------------- 7. the MQTT check wants CONNACK rc 0

/// A fake broker: answers each connection's first bytes with `reply` and
/// keeps what it received, so the check's packet can be inspected.
fn fake_broker(
    reply: Option<&'static [u8]>,
) -> Result<(SocketAddr, Arc<std::sync::Mutex<Vec<Vec<u8>>>>)> {
    let (l, addr) = listen_on(BROKER_IP)?;
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let got2 = got.clone();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let got = got2.clone();
            thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let mut buf = [0u8; 256];
                let n = s.read(&mut buf).unwrap_or(0);
                got.lock().unwrap().push(buf[..n].to_vec());
                match reply {
                    Some(r) => {
                        let _ = s.write_all(r);
                        let _ = s.read(&mut buf);
                    }
                    // Silent: hold the connection until the check gives up.
                    None => {
                        let _ = s.read(&mut buf);
                    }
                }
            });
        }
    });
    Ok((addr, got))
}

/// `health-check = "mqtt"` is an MQTT check, not a TCP one: a broker that
/// accepts TCP but refuses the CONNECT (CONNACK return code 5) and one that
/// never answers both go DOWN within fall × interval (plus slack); the
/// check's packet is an MQTT 3.1.1 CONNECT; with both down a client is
/// closed and "every upstream is down" logged.
#[test]
fn mqtt_check_wants_connack_return_code_0() -> Result<()> {
    let dir = scratch("balancing-connack");
    let (refusing, got_refusing) = fake_broker(Some(&[0x20, 0x02, 0x00, 0x05]))?;
    let (silent, _) = fake_broker(None)?;
    let interval = Duration::from_millis(300);
    let listen = splicer_addr();
    let metrics = splicer_addr();
    let started = Instant::now();
    let (mut s, _) = start_splicer(
        &dir,
        listen,
        &config(
            listen,
            Some(metrics),
            &[refusing.to_string(), silent.to_string()],
            "health-check = \"mqtt\"\nhealth-interval = \"300ms\"\nhealth-rise = 2\nhealth-fall = 2\n",
        ),
    )?;
    let bound = interval * 2 + Duration::from_secs(3);
    let refused = s.proc.wait_line(
        &down_line(refusing),
        bound.saturating_sub(started.elapsed()),
    )?;
    ensure!(
        refused.contains("CONNACK refused the check, return code 5"),
        "DOWN line for the refusing broker: {refused}"
    );
    let quiet = s
        .proc
        .wait_line(&down_line(silent), bound.saturating_sub(started.elapsed()))?;
    ensure!(
        quiet.contains("no answer within"),
        "DOWN line for the silent broker: {quiet}"
    );
    for up in [refusing, silent] {
        ensure!(
            upstream_up(metrics, up)? == 0.0,
            "upstream_up for {up} should be 0"
        );
    }
    let packets = got_refusing.lock().unwrap().clone();
    let first = packets
        .first()
        .context("the refusing broker got no check")?;
    ensure!(
        first.len() >= 2 && first[0] == 0x10 && usize::from(first[1]) == first.len() - 2,
        "the check did not send one whole CONNECT: {}",
        show(first)
    );
    ensure!(
        first[2..].starts_with(b"\x00\x04MQTT\x04"),
        "not an MQTT 3.1.1 CONNECT: {}",
        show(first)
    );

    // Both down: a client is closed without reaching either.
    let mut c = connect_from(CLIENT_IP, s.listen)?;
    let client = local(&c);
    let _ = c.write_all(b"\x10\x00");
    let mut back = Vec::new();
    match c.read_to_end(&mut back) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => bail!("client: {e} (splicer did not close it)"),
    }
    ensure!(back.is_empty(), "client got {}", show(&back));
    let line = s.proc.wait_line("every upstream is down", STEP)?;
    ensure!(line.contains(&client.to_string()), "all-down line: {line}");
    ensure!(
        s.proc.lines_with("connect failed").is_empty() && s.closed_lines().is_empty(),
        "a down upstream was tried:\n{}",
        s.proc.output()
    );
    Ok(())
}

// ------------------------------- 8. reload turning health checks off

/// An upstream that checks took DOWN, then a SIGHUP reload to
/// `health-check = "off"` ("no active checks and no passive marking: every
/// upstream is always tried"): it must take clients again once it listens.
/// (A reload carries each upstream's state over; with checks now off
/// nothing would ever bring a DOWN one back, so the reload marks it UP.)
#[test]
fn reload_to_health_check_off_brings_down_upstreams_back() -> Result<()> {
    let dir = scratch("balancing-reload-off");
    let mut a = Sink::start(b'A')?;
    let a_addr = a.addr;
    a.stop(); // A's port refuses connects from here on
    let b = Sink::start(b'B')?;
    let listen = splicer_addr();
    let metrics = splicer_addr();
    let ups = [a_addr.to_string(), b.addr.to_string()];
    let (mut s, path) = start_splicer(
        &dir,
        listen,
        &config(
            listen,
            Some(metrics),
            &ups,
            "health-check = \"tcp\"\nhealth-interval = \"60s\"\nhealth-fall = 1\n",
        ),
    )?;
    s.proc.wait_line(&down_line(a_addr), STEP)?;

    fs::write(
        &path,
        config(listen, Some(metrics), &ups, "health-check = \"off\"\n"),
    )?;
    ensure!(s.proc.signal(libc::SIGHUP));
    s.proc
        .wait_line(&format!("reload: {} applied", path.display()), STEP)?;
    let a = Sink::start_on(b'A', a_addr)?;
    let seq = (0..4)
        .map(|_| one(&s, CLIENT_IP, &[&a, &b]))
        .collect::<Result<Vec<u8>>>()?;
    ensure!(
        seq.contains(&b'A') && seq.contains(&b'B'),
        "with health-check off both upstreams should take clients, got {} \
         (upstream_up for A: {}):\n{}",
        ids(&seq),
        upstream_up(metrics, a_addr)?,
        s.proc.output()
    );
    Ok(())
}

// ------------------------------- 9. HTTP health checks (EMQX's drain API)

/// `health-check = "http"` against each broker's availability API, served
/// here by a real nginx on the brokers' addresses whose answer the test
/// flips between 200 and 503 (as EMQX's
/// `/api/v5/load_rebalance/availability_check` does while a node is
/// drained). A drained broker goes DOWN and gets no new client, while a
/// subscriber already on it keeps receiving; undrained, it comes back UP.
#[test]
fn http_checks_follow_a_drain_api() -> Result<()> {
    let dir = scratch("balancing-http-check");
    const PATH: &str = "/api/v5/load_rebalance/availability_check";
    let other_ip = Ipv4Addr::new(127, 0, 0, 6);
    let b1 = v4(BROKER_IP, free_port(BROKER_IP));
    let b2 = v4(other_ip, free_port(other_ip));
    let _broker1 = start_mosquitto(&dir.join("b1"), b1)?;
    let _broker2 = start_mosquitto(&dir.join("b2"), b2)?;
    // One API port on both brokers' addresses, as EMQX's 18083 would be.
    let api = loop {
        let p = free_port(BROKER_IP);
        if std::net::TcpListener::bind((other_ip, p)).is_ok() {
            break p;
        }
    };
    let drained = |b: SocketAddr| dir.join(format!("drained-{}", b.ip()));
    let server = |b: SocketAddr| {
        format!(
            "server {{ listen {}:{api}; location = {PATH} {{ if (-f {}) {{ return 503; }} return 200 \"ok\"; }} }}\n",
            b.ip(),
            drained(b).display()
        )
    };
    let nginx_dir = dir.join("nginx");
    fs::create_dir_all(&nginx_dir)?;
    let _nginx = start_nginx(
        &nginx_dir,
        v4(BROKER_IP, api),
        "",
        &format!("http {{ access_log off; {}{} }}", server(b1), server(b2)),
    )?;
    let listen = splicer_addr();
    let metrics = splicer_addr();
    let (mut s, _) = start_splicer(
        &dir,
        listen,
        &config(
            listen,
            Some(metrics),
            &[b1.to_string(), b2.to_string()],
            &format!(
                "health-check = \"http\"\nhealth-http-port = {api}\nhealth-http-path = \"{PATH}\"\n\
                 health-interval = \"300ms\"\nhealth-rise = 2\nhealth-fall = 2\n"
            ),
        ),
    )?;
    let (b1s, b2s) = (b1.to_string(), b2.to_string());
    let lines = (0..4).map(|n| publish(&s, n)).collect::<Result<Vec<_>>>()?;
    let ups = upstreams_of(&lines);
    ensure!(ups.contains(&b1s) && ups.contains(&b2s), "both should take clients: {ups:?}");

    // Drain broker 2 while a subscriber joins, so it lands on broker 1.
    fs::write(drained(b2), "")?;
    s.proc.wait_line(&down_line(b2), STEP)?;
    let mut sub = Proc::spawn_apart(
        "sub",
        &dir,
        Command::new("mosquitto_sub")
            .args(["-h", &listen.ip().to_string(), "-p", &listen.port().to_string()])
            .args(["-A", &CLIENT_IP.to_string(), "-i", "drain-sub", "-t", "t/drain", "-C", "1"]),
    )?;
    fs::remove_file(drained(b2))?;
    s.proc.wait_line(&up_line(b2), STEP)?;

    // Now drain broker 1: DOWN on the API's 503, no new client goes there.
    fs::write(drained(b1), "")?;
    let down = s.proc.wait_line(&down_line(b1), STEP)?;
    ensure!(down.contains("HTTP 503"), "DOWN should say why: {down}");
    ensure!(upstream_up(metrics, b1)? == 0.0);
    let lines = (4..8).map(|n| publish(&s, n)).collect::<Result<Vec<_>>>()?;
    let ups = upstreams_of(&lines);
    ensure!(ups.iter().all(|u| *u == b2s), "with {b1} drained every publish should go to {b2}: {ups:?}");
    // The subscriber on broker 1 still gets what is published there.
    let (st, out, err) = run_with_timeout(
        Command::new("mosquitto_pub")
            .args(["-h", &b1.ip().to_string(), "-p", &b1.port().to_string(), "-t", "t/drain", "-m", "still here"]),
        STEP,
    )?;
    ensure!(st.success(), "{out}{err}");
    ensure!(sub.wait_exit(STEP)?.success(), "subscriber: {}", sub.stderr());
    ensure!(sub.output() == "still here\n", "the subscriber on the drained broker got {:?}", sub.output());

    fs::remove_file(drained(b1))?;
    s.proc.wait_line(&up_line(b1), STEP)?;
    ensure!(upstream_up(metrics, b1)? == 1.0);
    Ok(())
}
