//! MQTT over WebSocket (issue 4): splicer's `--protocol ws` listener reads
//! the HTTP upgrade request, rewrites its forwarding headers the way the
//! nginx `location /mqtt { proxy_set_header ... }` blocks of the EMQX guide
//! do, and then splices the 101 response and every frame.
//!
//! Addresses: 127.0.0.2 client, 127.0.0.3 splicer (every tier, on its own
//! port), 127.0.0.4 sink or broker, 127.0.0.5 nginx (listens there and
//! binds its upstream side there too). splicer's own upstream connections
//! come from 127.0.0.1, so that is the address the next tier appends.
//!
//! The "sink" is a TcpListener in the test that reads the request head
//! exactly as the broker would get it, so headers can be compared byte for
//! byte. WebSocket frames and the Sec-WebSocket-Key/Accept values come from
//! splicer_testkit::ws; the upgrade requests are written out here, since
//! those bytes are what the tests compare.
use std::{
    fs,
    io::{BufReader, BufWriter, Cursor, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use splicer_testkit::ws;
use splicer_tests::*;

/// RFC 6455 section 1.3's example key and the Accept it must produce.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// The headers splicer rewrites; every other header must pass untouched.
const FORWARDING: [&str; 3] = ["x-forwarded-for", "x-forwarded-port", "x-real-ip"];

/// The guide's real client, behind an outer hop.
const REAL_CLIENT: &str = "115.236.21.86";

/// What one forwarding header must look like in the rewritten head.
enum Want<'a> {
    /// Exactly one line, exactly `Name: value`.
    Line(&'a str),
    Absent,
}

/// Checks the head splicer sent on against the one it got: the request
/// line and every non-forwarding header byte for byte and in order, the
/// forwarding headers only after all of those (appended at the end), and
/// each of them as `want` says.
fn check_rewrite(sent: &[u8], got: &[u8], want: &[(&str, Want)]) -> Result<()> {
    let ctx = || format!("\nsent:\n{}\ngot:\n{}", show(sent), show(got));
    ensure!(
        first_line(sent) == first_line(got),
        "request line changed{}",
        ctx()
    );
    let is_fwd = |l: &&[u8]| FORWARDING.contains(&line_name(l).as_str());
    let kept_sent: Vec<&[u8]> = header_lines(sent)
        .into_iter()
        .filter(|l| !is_fwd(l))
        .collect();
    let got_lines = header_lines(got);
    let kept_got: Vec<&[u8]> = got_lines.iter().copied().filter(|l| !is_fwd(l)).collect();
    ensure!(
        kept_sent == kept_got,
        "the other headers did not pass byte for byte, in order{}",
        ctx()
    );
    if let Some(first_fwd) = got_lines.iter().position(is_fwd) {
        ensure!(
            got_lines[first_fwd..].iter().all(is_fwd),
            "forwarding headers are not at the end of the head{}",
            ctx()
        );
    }
    for (name, w) in want {
        let lines: Vec<String> = got_lines
            .iter()
            .filter(|l| line_name(l) == name.to_ascii_lowercase())
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        match w {
            Want::Line(line) => ensure!(
                lines == [*line],
                "want exactly one {line:?}, got {lines:?}{}",
                ctx()
            ),
            Want::Absent => ensure!(lines.is_empty(), "want no {name}, got {lines:?}{}", ctx()),
        }
    }
    Ok(())
}

/// The sink: accepts one connection and reads its request head. Returns
/// the connection, the head and any bytes that came right behind it.
fn sink_head(l: &TcpListener) -> Result<(TcpStream, Vec<u8>, Vec<u8>)> {
    let mut s = accept_within(l, STEP)?.context("nothing connected to the sink")?;
    let (head, rest) = read_head(&mut s).context("sink")?;
    Ok((s, head, rest))
}

/// The sink as a broker that takes the upgrade: `sink_head`, then a `101`.
/// splicer holds every client byte behind the request until the broker
/// has switched protocols, so `rest` is empty here.
fn sink_switched(l: &TcpListener) -> Result<(TcpStream, Vec<u8>, Vec<u8>)> {
    let (mut s, head, rest) = sink_head(l)?;
    s.write_all(&switching(&head))?;
    Ok((s, head, rest))
}

/// Sends `req` from `from` to `to` and returns (client address, the head
/// the sink got). The sink switches protocols; both connections are closed
/// afterwards.
fn request_through(
    from: Ipv4Addr,
    to: SocketAddr,
    req: &[u8],
    sink_l: &TcpListener,
) -> Result<(SocketAddr, Vec<u8>)> {
    let mut c = connect_from(from, to)?;
    let client = local(&c);
    c.write_all(req)?;
    let (s, head, rest) = sink_switched(sink_l)?;
    ensure!(
        rest.is_empty(),
        "sink got {} bytes after the head",
        rest.len()
    );
    drop(c);
    drop(s);
    Ok((client, head))
}

// ---------------------------------------------------- splicer tiers

/// One splicer tier with `--protocol ws`, in its own log directory (two
/// tiers in one directory would share splicer.log).
fn ws_tier(
    dir: &Path,
    name: &str,
    mode: &str,
    upstream: SocketAddr,
    extra: &[&str],
) -> Result<Splicer> {
    let d = dir.join(name);
    fs::create_dir_all(&d)?;
    let mut args = vec!["--protocol", "ws"];
    args.extend_from_slice(extra);
    splicer_in_mode(&d, mode, upstream, &args).with_context(|| format!("starting {name}"))
}

// ------------------------------------------------------ WebSocket frames

/// A mask key that differs per frame (never all zero).
fn mask_key(i: u64) -> [u8; 4] {
    ((i as u32).wrapping_mul(0x9E37_79B9) ^ 0xA5A5_5A5A).to_be_bytes()
}

/// Payload bytes per bulk frame (a 2-byte extended length).
const FRAME_PAYLOAD: usize = 32 * 1024;

/// Writes `len` pattern bytes as binary frames, then a Close frame and a
/// FIN.
fn send_frames(s: TcpStream, seed: u64, len: u64, masked: bool) -> Result<()> {
    let mut w = BufWriter::with_capacity(256 * 1024, s.try_clone()?);
    let mut p = Pattern::new(seed);
    let mut chunk = vec![0u8; FRAME_PAYLOAD];
    let (mut left, mut i) = (len, 0u64);
    while left > 0 {
        let n = left.min(FRAME_PAYLOAD as u64) as usize;
        p.fill(&mut chunk[..n]);
        w.write_all(&ws::frame(ws::BINARY, &chunk[..n], masked.then(|| mask_key(i))))
            .with_context(|| format!("writing frame {i}"))?;
        left -= n as u64;
        i += 1;
    }
    w.write_all(&ws::frame(ws::CLOSE, &[], masked.then(|| mask_key(i))))?;
    w.flush()?;
    s.shutdown(Shutdown::Write)?;
    Ok(())
}

/// Reads binary frames until a Close frame, checks every payload byte
/// against the pattern and that masking is as a `masked` sender's must
/// be, then expects EOF. `early` is what was read past the head already.
fn expect_frames(s: TcpStream, early: Vec<u8>, seed: u64, len: u64, masked: bool) -> Result<()> {
    let mut r = BufReader::with_capacity(256 * 1024, Cursor::new(early).chain(s));
    let mut p = Pattern::new(seed);
    let (mut got, mut frames) = (0u64, 0u64);
    let mut payload = vec![0u8; FRAME_PAYLOAD];
    let mut want = vec![0u8; FRAME_PAYLOAD];
    loop {
        let at = || format!("frame {frames}, after {got} of {len} payload bytes");
        let h = ws::read_header(&mut r).with_context(at)?;
        let n = h.len;
        ensure!(
            h.mask.is_some() == masked,
            "{}: mask bit {} (want {masked})",
            at(),
            u8::from(h.mask.is_some())
        );
        if h.first == 0x88 {
            ensure!(n == 0, "{}: Close frame with {n} bytes", at());
            break;
        }
        ensure!(
            h.first == 0x82 && n as usize <= FRAME_PAYLOAD && got + n <= len,
            "{}: unexpected frame header {:02x}, length {n}",
            at(),
            h.first
        );
        let n = n as usize;
        r.read_exact(&mut payload[..n]).with_context(at)?;
        if let Some(key) = h.mask {
            ws::unmask(&mut payload[..n], key);
        }
        p.fill(&mut want[..n]);
        if payload[..n] != want[..n] {
            let i = (0..n).find(|&i| payload[i] != want[i]).unwrap();
            bail!("payload byte {} differs ({})", got + i as u64, at());
        }
        got += n as u64;
        frames += 1;
    }
    ensure!(got == len, "Close after {got} of {len} payload bytes");
    let mut extra = [0u8; 1];
    ensure!(
        r.read(&mut extra).context("waiting for EOF after Close")? == 0,
        "bytes after the Close frame"
    );
    Ok(())
}

// ----------------------------------------------------------------- peers

/// mqtt-client.js over `ws://{to}/mqtt` from CLIENT_IP.
fn ws_client_cmd(to: SocketAddr, id: &str, args: &[&str]) -> Command {
    mqtt_client_cmd(&format!("ws://{to}/mqtt"), id, args)
}

/// Runs mqtt-client.js to completion; fails unless it exits 0 bound to
/// 127.0.0.2. Returns its stdout.
fn run_ws_client(to: SocketAddr, id: &str, args: &[&str]) -> Result<String> {
    let out = run_mqtt_client(
        &format!("ws://{to}/mqtt"),
        id,
        args,
        Duration::from_secs(25),
    )?;
    client_connected(&out, id)?;
    Ok(out)
}

/// Waits for aedes' `client` line for `id` and checks the address its
/// protocol decoder took from the upgrade headers.
fn aedes_ws_client(broker: &mut Proc, id: &str, ip: &str) -> Result<String> {
    let seen = aedes_client(broker, id)?;
    eprintln!("aedes: {seen}");
    let field = |f: &str| json_field(&seen, f).unwrap_or_default();
    ensure!(field("ip") == ip, "aedes should report ip {ip}: {seen}");
    ensure!(
        field("transport") == "ws" && field("source") == "decoder",
        "not decoded from a WebSocket upgrade: {seen}"
    );
    ensure!(
        field("socketIp") == "127.0.0.1",
        "aedes' TCP peer is not splicer: {seen}"
    );
    Ok(seen)
}

/// Subscriber and publisher (separate connections, both through `to`)
/// round-trip two QoS 1 messages; returns the two client ids.
fn pub_sub_roundtrip(
    dir: &Path,
    to: SocketAddr,
    tag: &str,
    sub_extra: &[&str],
) -> Result<[String; 2]> {
    let topic = format!("ws/{tag}");
    let sub_id = format!("ws-sub-{tag}");
    let pub_id = format!("ws-pub-{tag}");
    let mut args = vec![
        "--subscribe",
        &topic,
        "--count",
        "2",
        "--qos",
        "1",
        "--timeout-ms",
        "20000",
    ];
    args.extend_from_slice(sub_extra);
    let mut sub = Proc::spawn_apart(&sub_id, dir, &mut ws_client_cmd(to, &sub_id, &args))?;
    sub.wait_line("\"event\":\"subscribed\"", STEP)?;
    let payloads = [format!("{tag}-one"), format!("{tag}-two")];
    let out = run_ws_client(
        to,
        &pub_id,
        &[
            "--publish",
            &topic,
            &payloads[0],
            "--publish",
            &topic,
            &payloads[1],
            "--qos",
            "1",
            "--timeout-ms",
            "20000",
        ],
    )?;
    // At QoS 1 `published` means the broker acked it.
    ensure!(
        out.lines().filter(|l| is_event(l, "published")).count() == 2,
        "publisher:\n{out}"
    );
    let st = sub.wait_exit(Duration::from_secs(25))?;
    let (out, err) = (sub.output(), sub.stderr());
    let got: Vec<(String, String)> = out
        .lines()
        .filter(|l| is_event(l, "message"))
        .map(|l| {
            (
                json_field(l, "topic").unwrap_or_default(),
                json_field(l, "payload").unwrap_or_default(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = payloads
        .iter()
        .map(|p| (topic.clone(), p.clone()))
        .collect();
    ensure!(
        got == want,
        "subscriber got {got:?}, want {want:?}\nstdout:\n{out}stderr:\n{err}"
    );
    ensure!(st.success(), "subscriber exited {st}: {err}");
    Ok([sub_id, pub_id])
}

/// Every close line names a 127.0.0.2 client and the upstream; in sockmap
/// mode the kernel carried bytes, in userspace mode none.
fn check_close_lines(s: &Splicer, n: usize, mode: &str, upstream: SocketAddr) -> Result<()> {
    let closed = s.wait_closed(n, STEP)?;
    let up = upstream.to_string();
    for l in &closed {
        eprintln!("{mode}: {l}");
        ensure!(
            close_field(l, "client").is_some_and(|c| c.starts_with("127.0.0.2:"))
                && close_field(l, "upstream") == Some(up.as_str()),
            "unexpected close line: {l}"
        );
    }
    ensure!(closed.len() == n, "{} close lines, want {n}", closed.len());
    check_kernel_bytes(&closed, mode, true)
}

// ---------------------------------------- 1. MQTT.js to aedes and mosquitto

fn mqttjs_over_ws_in(mode: &str) -> Result<()> {
    let dir = scratch(&format!("ws-mqttjs-{mode}"));

    // aedes: its decoder reports the address from X-Forwarded-For.
    let (mut broker, broker_addr) = start_aedes_ws(&dir)?;
    let splicer = ws_tier(&dir, "splicer-aedes", mode, broker_addr, &[])?;
    // The subscriber also forges X-Forwarded-For (override replaces it) and
    // X-Real-IP (which aedes would prefer; splicer drops it from an
    // untrusted peer).
    let ids = pub_sub_roundtrip(
        &dir,
        splicer.listen,
        &format!("aedes-{mode}"),
        &[
            "--ws-header",
            "X-Forwarded-For: 6.6.6.6",
            "--ws-header",
            "X-Real-IP: 6.6.6.6",
        ],
    )?;
    for id in &ids {
        let seen = aedes_ws_client(&mut broker, id, "127.0.0.2")?;
        ensure!(
            json_field(&seen, "x-forwarded-for").as_deref() == Some("127.0.0.2"),
            "aedes got X-Forwarded-For other than the client's own address: {seen}"
        );
    }
    check_close_lines(&splicer, 2, mode, broker_addr)?;

    // mosquitto's own websockets listener.
    let mdir = dir.join("mosquitto");
    fs::create_dir_all(&mdir)?;
    let (mosq, mosq_addr) = match start_mosquitto_ws(&mdir)? {
        Ok(m) => m,
        Err(why) => {
            eprintln!("SKIPPED the mosquitto part: {why}");
            return Ok(());
        }
    };
    let splicer = ws_tier(&dir, "splicer-mosquitto", mode, mosq_addr, &[])?;
    let ids = pub_sub_roundtrip(&mdir, splicer.listen, &format!("mosq-{mode}"), &[])?;
    // Both sessions reached mosquitto (through splicer, from 127.0.0.1).
    for id in &ids {
        let line = mosq
            .lines_with(&format!(" as {id} "))
            .into_iter()
            .next()
            .with_context(|| format!("mosquitto never saw {id}:\n{}", mosq.output()))?;
        // lws listens dual-stack, so it may print the mapped form.
        ensure!(
            line.contains("from 127.0.0.1:") || line.contains("from ::ffff:127.0.0.1:"),
            "{id} did not reach mosquitto through splicer: {line}"
        );
    }
    check_close_lines(&splicer, 2, mode, mosq_addr)?;
    Ok(())
}

/// MQTT.js over ws://127.0.0.3:P/mqtt (bound to 127.0.0.2) through splicer
/// `--protocol ws`: aedes' decoder reports 127.0.0.2 (a forged
/// X-Forwarded-For is overridden) and a QoS 1 pub/sub round trip works; the
/// same round trip works through to mosquitto's websockets listener. In
/// sockmap mode every session was spliced in the kernel.
#[test]
fn mqttjs_over_ws_to_aedes_and_mosquitto() -> Result<()> {
    for mode in MODES {
        mqttjs_over_ws_in(mode).with_context(|| format!("offload {mode}"))?;
    }
    Ok(())
}

// -------------------------------------- 2. method 1: override, then append

fn method1_in(mode: &str) -> Result<()> {
    let dir = scratch(&format!("ws-method1-{mode}"));
    let (sink_l, sink_addr) = listen_on(BROKER_IP)?;
    // LB2 appends both headers, like the guide's LB 2.
    let lb2 = ws_tier(
        &dir,
        "lb2",
        mode,
        sink_addr,
        &["--forwarded-for", "append", "--forwarded-port", "append"],
    )?;
    let lb1 = ws_tier(
        &dir,
        "lb1",
        mode,
        lb2.listen,
        &["--forwarded-for", "override"],
    )?;
    // The guide's spoof: the client claims to be local.
    let sent = upgrade_request(
        lb1.listen,
        "/mqtt",
        WS_KEY,
        &["X-Forwarded-For: 127.0.0.1", "X-Forwarded-Port: 1"],
    );
    let (client, head) = request_through(CLIENT_IP, lb1.listen, &sent, &sink_l)?;
    eprintln!("{mode}: the sink got\n{}", String::from_utf8_lossy(&head));

    // LB2 saw LB1 as 127.0.0.1:N; its close line says which N.
    let lb2_line = lb2.wait_closed(1, STEP)?.remove(0);
    let lb1_side: SocketAddr = close_field(&lb2_line, "client")
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("LB2 close line: {lb2_line}"))?;
    ensure!(
        lb1_side.ip() == Ipv4Addr::LOCALHOST,
        "LB2's peer should be LB1 (127.0.0.1): {lb2_line}"
    );
    check_rewrite(
        &sent,
        &head,
        &[
            (
                "X-Forwarded-For",
                Want::Line("X-Forwarded-For: 127.0.0.2, 127.0.0.1"),
            ),
            (
                "X-Forwarded-Port",
                Want::Line(&format!(
                    "X-Forwarded-Port: {}, {}",
                    client.port(),
                    lb1_side.port()
                )),
            ),
            ("X-Real-IP", Want::Absent),
        ],
    )?;
    lb1.close_line_for(client, STEP)?;

    // End to end with a real client and broker: aedes takes the leftmost
    // X-Forwarded-For entry, which must be the client, not the forgery.
    let adir = dir.join("aedes");
    fs::create_dir_all(&adir)?;
    let (mut broker, broker_addr) = start_aedes_ws(&adir)?;
    let lb2 = ws_tier(
        &adir,
        "lb2",
        mode,
        broker_addr,
        &["--forwarded-for", "append"],
    )?;
    let lb1 = ws_tier(
        &adir,
        "lb1",
        mode,
        lb2.listen,
        &["--forwarded-for", "override"],
    )?;
    let id = format!("ws-m1-{mode}");
    run_ws_client(
        lb1.listen,
        &id,
        &[
            "--ws-header",
            "X-Forwarded-For: 127.0.0.1",
            "--publish",
            "t/m1",
            "hi",
        ],
    )?;
    let seen = aedes_ws_client(&mut broker, &id, "127.0.0.2")?;
    ensure!(
        json_field(&seen, "x-forwarded-for").as_deref() == Some("127.0.0.2, 127.0.0.1"),
        "aedes got the wrong X-Forwarded-For: {seen}"
    );
    Ok(())
}

/// The guide's method 1 with two splicer tiers: a raw client forges
/// `X-Forwarded-For: 127.0.0.1` → LB1 (override) → LB2 (append) → sink.
/// The sink sees exactly one `X-Forwarded-For: 127.0.0.2, 127.0.0.1` and
/// `X-Forwarded-Port: <client port>, <LB1's port>`, appended after every
/// other header, which all arrive byte for byte in order. Then MQTT.js
/// through the same chain to aedes: aedes reports 127.0.0.2.
#[test]
fn method1_override_then_append() -> Result<()> {
    for mode in MODES {
        method1_in(mode).with_context(|| format!("offload {mode}"))?;
    }
    Ok(())
}

// ------------------------------------ 3. method 2: trusted, real-ip walk

const REAL_IP_ARGS: [&str; 8] = [
    "--forwarded-for",
    "append",
    "--trusted-proxy",
    "127.0.0.0/8",
    "--real-ip-header",
    "X-Forwarded-For",
    "--set-real-ip-header",
    "X-Real-IP",
];

/// The client's request for method 2: it sits behind an outer hop that
/// named the real client, and it also forges an X-Real-IP that the
/// innermost tier must replace.
fn method2_request(to: SocketAddr) -> Vec<u8> {
    upgrade_request(
        to,
        "/mqtt",
        WS_KEY,
        &[
            format!("X-Forwarded-For: {REAL_CLIENT}").as_str(),
            "X-Real-IP: 6.6.6.6",
        ],
    )
}

fn method2_in(mode: &str, recursive: bool) -> Result<()> {
    let tag = if recursive { "rec" } else { "norec" };
    let dir = scratch(&format!("ws-method2-{mode}-{tag}"));
    let (sink_l, sink_addr) = listen_on(BROKER_IP)?;
    let mut lb3_args = REAL_IP_ARGS.to_vec();
    if recursive {
        lb3_args.push("--real-ip-recursive");
    }
    let lb3 = ws_tier(&dir, "lb3", mode, sink_addr, &lb3_args)?;
    let append = ["--forwarded-for", "append"];

    // All splicer: LB1 → LB2 → LB3. LB3 gets "REAL, 127.0.0.2, 127.0.0.1"
    // from peer 127.0.0.1; the rightmost entry is what LB2 appended.
    let lb2 = ws_tier(&dir, "lb2", mode, lb3.listen, &append)?;
    let lb1 = ws_tier(&dir, "lb1", mode, lb2.listen, &append)?;
    let sent = method2_request(lb1.listen);
    let (_, head) = request_through(CLIENT_IP, lb1.listen, &sent, &sink_l)?;
    eprintln!(
        "{mode} recursive={recursive}, splicer chain: the sink got\n{}",
        String::from_utf8_lossy(&head)
    );
    let real_ip = if recursive { REAL_CLIENT } else { "127.0.0.1" };
    check_rewrite(
        &sent,
        &head,
        &[
            (
                "X-Forwarded-For",
                Want::Line(&format!(
                    "X-Forwarded-For: {REAL_CLIENT}, 127.0.0.2, 127.0.0.1, 127.0.0.1"
                )),
            ),
            ("X-Real-IP", Want::Line(&format!("X-Real-IP: {real_ip}"))),
            // The party LB3 names came from X-Forwarded-For with no port of
            // its own (and no X-Forwarded-Port kept in step): as with nginx,
            // whose $remote_port is then empty, no port is sent rather than
            // LB2's (issue 11).
            ("X-Forwarded-Port", Want::Absent),
        ],
    )?;

    // nginx as the middle tier: LB3's peer is now 127.0.0.5 and the
    // rightmost entry (LB1's 127.0.0.1, appended by nginx) differs from it,
    // so recursive off must pick the entry, not the peer.
    let ndir = dir.join("nginx");
    fs::create_dir_all(&ndir)?;
    let (_nginx, nginx_addr) = start_nginx_ws(&ndir, lb3.listen)?;
    let lb1n = ws_tier(&dir, "lb1-nginx", mode, nginx_addr, &append)?;
    let mut c = connect_from(CLIENT_IP, lb1n.listen)?;
    c.write_all(&method2_request(lb1n.listen))?;
    let (s, head, _) = sink_switched(&sink_l)?;
    drop(c);
    drop(s);
    eprintln!(
        "{mode} recursive={recursive}, via nginx: the sink got\n{}",
        String::from_utf8_lossy(&head)
    );
    let xff = header_values(&head, "X-Forwarded-For");
    let want_xff = format!("{REAL_CLIENT}, 127.0.0.2, 127.0.0.1, 127.0.0.5");
    ensure!(
        xff == [want_xff.clone()],
        "via nginx: X-Forwarded-For {xff:?}, want [{want_xff:?}]"
    );
    let real = header_values(&head, "X-Real-IP");
    ensure!(
        real == [real_ip],
        "via nginx: X-Real-IP {real:?}, want [{real_ip:?}]"
    );
    // nginx re-sent the upgrade headers; they still reached the broker side.
    ensure!(
        header_values(&head, "Sec-WebSocket-Key") == [WS_KEY]
            && header_values(&head, "Upgrade") == ["websocket"],
        "via nginx: upgrade headers lost:\n{}",
        show(&head)
    );
    Ok(())
}

/// An untrusted peer's X-Forwarded-For counts for nothing: X-Real-IP is the
/// peer itself.
fn method2_untrusted_in(mode: &str) -> Result<()> {
    let dir = scratch(&format!("ws-method2-untrusted-{mode}"));
    let (sink_l, sink_addr) = listen_on(BROKER_IP)?;
    let mut args = REAL_IP_ARGS.to_vec();
    args[3] = "127.0.0.5/32";
    args.push("--real-ip-recursive");
    let lb = ws_tier(&dir, "lb", mode, sink_addr, &args)?;
    let sent = method2_request(lb.listen);
    let (_, head) = request_through(CLIENT_IP, lb.listen, &sent, &sink_l)?;
    check_rewrite(
        &sent,
        &head,
        &[
            (
                "X-Forwarded-For",
                Want::Line(&format!("X-Forwarded-For: {REAL_CLIENT}, 127.0.0.2")),
            ),
            ("X-Real-IP", Want::Line("X-Real-IP: 127.0.0.2")),
        ],
    )
}

/// With aedes behind the innermost tier: its decoder prefers X-Real-IP,
/// so it reports the real client.
fn method2_aedes_in(mode: &str) -> Result<()> {
    let dir = scratch(&format!("ws-method2-aedes-{mode}"));
    let (mut broker, broker_addr) = start_aedes_ws(&dir)?;
    let mut args = REAL_IP_ARGS.to_vec();
    args.push("--real-ip-recursive");
    let lb2 = ws_tier(&dir, "lb2", mode, broker_addr, &args)?;
    let lb1 = ws_tier(
        &dir,
        "lb1",
        mode,
        lb2.listen,
        &["--forwarded-for", "append"],
    )?;
    let id = format!("ws-m2-{mode}");
    run_ws_client(
        lb1.listen,
        &id,
        &[
            "--ws-header",
            &format!("X-Forwarded-For: {REAL_CLIENT}"),
            "--ws-header",
            "X-Real-IP: 6.6.6.6",
            "--publish",
            "t/m2",
            "hi",
        ],
    )?;
    aedes_ws_client(&mut broker, &id, REAL_CLIENT)?;
    Ok(())
}

/// The guide's method 2: every tier appends, the innermost has
/// `--trusted-proxy 127.0.0.0/8 --real-ip-header X-Forwarded-For
/// --set-real-ip-header X-Real-IP`. With `--real-ip-recursive`, X-Real-IP is
/// 115.236.21.86 (the client's claimed real client, behind it); without, the
/// rightmost entry (the address the previous tier appended), as in the
/// guide's last capture. The client's forged X-Real-IP is replaced, and the
/// innermost tier appends its direct peer ($realip_remote_addr). Run with
/// three splicer tiers and with nginx as the middle tier; an untrusted
/// peer's header is ignored; aedes behind the chain reports the real client.
#[test]
fn method2_real_ip_recursive() -> Result<()> {
    for mode in MODES {
        for recursive in [true, false] {
            method2_in(mode, recursive)
                .with_context(|| format!("offload {mode}, recursive {recursive}"))?;
        }
        method2_untrusted_in(mode).with_context(|| format!("offload {mode}, untrusted"))?;
        method2_aedes_in(mode).with_context(|| format!("offload {mode}, aedes"))?;
    }
    Ok(())
}

// ------------------------------------------------------------ 4. refusals

fn refusals_in(mode: &str) -> Result<()> {
    let dir = scratch(&format!("ws-refusals-{mode}"));
    // The upstream: nothing may connect to it until the valid upgrade.
    let (sink_l, sink_addr) = listen_on(BROKER_IP)?;
    let mut splicer = ws_tier(
        &dir,
        "splicer",
        mode,
        sink_addr,
        &["--ws-header-max", "2048", "--ws-header-timeout", "500ms"],
    )?;
    let to = splicer.listen;
    let valid = |path: &str| upgrade_request(to, path, WS_KEY, &[]);
    let oversized = upgrade_request(
        to,
        "/mqtt",
        WS_KEY,
        &[format!("X-Padding: {}", "p".repeat(3000)).as_str()],
    );
    let half = valid("/mqtt")[..60].to_vec();
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("wrong path", valid("/other"), "HTTP/1.1 404 Not Found"),
        (
            "not an upgrade",
            format!("GET /mqtt HTTP/1.1\r\nHost: {to}\r\n\r\n").into_bytes(),
            "HTTP/1.1 426 Upgrade Required",
        ),
        (
            "garbage",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n".to_vec(),
            "HTTP/1.1 400 Bad Request",
        ),
        (
            "oversized head",
            oversized,
            "HTTP/1.1 431 Request Header Fields Too Large",
        ),
        ("slowloris", half, "HTTP/1.1 408 Request Timeout"),
    ];
    for (what, bytes, want) in &cases {
        let mut c = connect_from(CLIENT_IP, to)?;
        let t0 = Instant::now();
        c.write_all(bytes)?;
        let (status, end) = read_refusal(&mut c).with_context(|| what.to_string())?;
        let took = t0.elapsed();
        eprintln!("{mode}: {what}: {status:?}, then {end}, after {took:?}");
        ensure!(status == *want, "{what}: got {status:?}, want {want:?}");
        if *what == "slowloris" {
            ensure!(
                took >= Duration::from_millis(400) && took <= Duration::from_secs(2),
                "slowloris answered after {took:?} (--ws-header-timeout 500ms)"
            );
        } else {
            ensure!(
                took < Duration::from_millis(400),
                "{what}: answered only after {took:?}"
            );
        }
    }
    ensure!(
        accept_within(&sink_l, Duration::from_millis(300))?.is_none(),
        "a refused request reached the upstream"
    );
    let refused = splicer.proc.lines_with("refused WebSocket upgrade (");
    for (_, _, want) in &cases {
        let code = &want[9..12];
        ensure!(
            refused
                .iter()
                .any(|l| l.contains(&format!("refused WebSocket upgrade ({code}"))),
            "no `refused WebSocket upgrade ({code}` log line:\n{}",
            splicer.proc.output()
        );
    }

    // splicer is still healthy: a valid upgrade goes through.
    let sent = valid("/mqtt");
    let (client, head) = request_through(CLIENT_IP, to, &sent, &sink_l)?;
    check_rewrite(
        &sent,
        &head,
        &[("X-Forwarded-For", Want::Line("X-Forwarded-For: 127.0.0.2"))],
    )?;
    splicer.close_line_for(client, STEP)?;

    splicer.proc.stop();
    let stopping = splicer.proc.lines_with("stopping:");
    ensure!(
        stopping.len() == 1 && stopping[0].split_whitespace().any(|w| w == "ws_refused=5"),
        "want ws_refused=5 in the stopping line:\n{}",
        splicer.proc.output()
    );
    Ok(())
}

/// One ws listener (`--ws-header-max 2048 --ws-header-timeout 500ms`):
/// wrong path → 404, a GET without Upgrade → 426, garbage → 400, a 3 KB
/// head → 431, half a head and silence → 408 after 0.4–2 s. Each status
/// line is exact, the response complete (Content-Length matches), then the
/// connection closes; each is logged; nothing connects upstream. A valid
/// upgrade still works afterwards, and the `stopping:` line at SIGTERM
/// counts ws_refused=5.
#[test]
fn refusals_get_status_codes() -> Result<()> {
    for mode in MODES {
        refusals_in(mode).with_context(|| format!("offload {mode}"))?;
    }
    Ok(())
}

// ------------------------------------------------- 5. early frames are kept

fn early_frames_in(mode: &str) -> Result<()> {
    let dir = scratch(&format!("ws-early-{mode}"));
    let (sink_l, sink_addr) = listen_on(BROKER_IP)?;
    let splicer = ws_tier(&dir, "splicer", mode, sink_addr, &[])?;
    let sent = upgrade_request(splicer.listen, "/mqtt", WS_KEY, &[]);
    // An MQTT CONNECT in a masked binary frame, as a client that does not
    // wait for the 101 sends it.
    let connect = [
        0x10, 0x10, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x04, b'e',
        b'a', b'r', b'l',
    ];
    let early = ws::frame(ws::BINARY, &connect, Some(mask_key(7)));
    let mut c = connect_from(CLIENT_IP, splicer.listen)?;
    let client = local(&c);
    c.write_all(&[&sent[..], &early].concat())?;

    let (mut s, head, mut rest) = sink_switched(&sink_l)?;
    ensure!(rest.is_empty(), "early frames reached the sink before its 101: {}", show(&rest));
    check_rewrite(
        &sent,
        &head,
        &[("X-Forwarded-For", Want::Line("X-Forwarded-For: 127.0.0.2"))],
    )?;
    let mut buf = [0u8; 1024];
    while rest.len() < early.len() {
        let n = s.read(&mut buf).with_context(|| {
            format!(
                "sink: {} of the {} early frame bytes",
                rest.len(),
                early.len()
            )
        })?;
        ensure!(
            n > 0,
            "EOF after {} of {} early frame bytes",
            rest.len(),
            early.len()
        );
        rest.extend_from_slice(&buf[..n]);
    }
    ensure!(
        rest == early,
        "after the head the sink got {}, want {}",
        show(&rest),
        show(&early)
    );
    // And nothing else: the client's FIN comes next.
    c.shutdown(Shutdown::Write)?;
    let more = read_to_end_timeout(&mut s, STEP)?;
    ensure!(more.is_empty(), "sink got extra bytes {}", show(&more));
    drop(s);
    let got = read_to_end_timeout(&mut c, STEP)?;
    ensure!(
        got == switching(&head),
        "client got {}, want the sink's 101 and nothing else",
        show(&got)
    );
    splicer.close_line_for(client, STEP)?;
    Ok(())
}

/// The client writes the upgrade request and a masked binary frame in one
/// write: the sink gets the rewritten head followed by exactly those frame
/// bytes, and nothing more.
#[test]
fn early_frames_after_the_upgrade_are_kept() -> Result<()> {
    for mode in MODES {
        early_frames_in(mode).with_context(|| format!("offload {mode}"))?;
    }
    Ok(())
}

// ---------------------------------------------- 6. bulk frames each way

const BULK: u64 = 64 << 20;

fn bulk_in(mode: &str) -> Result<()> {
    ensure!(
        ws::accept(WS_KEY) == WS_ACCEPT,
        "the kit's Sec-WebSocket-Accept is wrong: {}",
        ws::accept(WS_KEY)
    );
    let dir = scratch(&format!("ws-bulk-{mode}"));
    let (server_l, server_addr) = listen_on(BROKER_IP)?;
    let splicer = ws_tier(&dir, "splicer", mode, server_addr, &[])?;
    let timeout = Some(Duration::from_secs(60));

    // A per-run key, so the Accept check proves this request's key arrived.
    let mut raw = [0u8; 16];
    Pattern::new(u64::from(splicer.listen.port())).fill(&mut raw);
    let key = ws::key(&raw);
    let mut c = connect_from(CLIENT_IP, splicer.listen)?;
    let client = local(&c);
    c.write_all(&upgrade_request(splicer.listen, "/mqtt", &key, &[]))?;

    // The upstream answers like a WebSocket server.
    let (mut s, head, early) = sink_head(&server_l)?;
    ensure!(early.is_empty(), "client frames before the 101");
    let got_key = header_values(&head, "Sec-WebSocket-Key");
    ensure!(
        got_key == [key.clone()],
        "server got key {got_key:?}, sent {key}"
    );
    s.write_all(
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\
             Sec-WebSocket-Protocol: mqtt\r\n\r\n",
            ws::accept(&key)
        )
        .as_bytes(),
    )?;
    let (resp, early) = read_head(&mut c).context("client: the 101")?;
    ensure!(
        first_line(&resp) == "HTTP/1.1 101 Switching Protocols",
        "client got {}",
        show(&resp)
    );
    ensure!(
        header_values(&resp, "Sec-WebSocket-Accept") == [ws::accept(&key)],
        "wrong Sec-WebSocket-Accept: {}",
        show(&resp)
    );

    for sock in [&c, &s] {
        sock.set_read_timeout(timeout)?;
        sock.set_write_timeout(timeout)?;
    }
    // splicer reads the broker's 101 itself, passes it on and then hands
    // the sockets to the kernel; what the server sent in between would be
    // forwarded by userspace (correctly, but not by the kernel that this
    // test measures). Start the bulk once the handoff is surely done.
    thread::sleep(Duration::from_millis(200));
    let cpu0 = splicer.proc.cpu_seconds();
    let t0 = Instant::now();
    let (c2, s2) = (c.try_clone()?, s.try_clone()?);
    let (c3, s3) = (c.try_clone()?, s.try_clone()?);
    let jobs = [
        thread::spawn(move || send_frames(c2, 1, BULK, true).context("client → server: sending")),
        thread::spawn(move || {
            expect_frames(s2, Vec::new(), 1, BULK, true).context("client → server: receiving")
        }),
        thread::spawn(move || send_frames(s3, 2, BULK, false).context("server → client: sending")),
        thread::spawn(move || {
            expect_frames(c3, early, 2, BULK, false).context("server → client: receiving")
        }),
    ];
    for j in jobs {
        j.join().expect("bulk thread panicked")?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = splicer.proc.cpu_seconds() - cpu0;
    eprintln!(
        "{mode}: 2 x 64 MiB of frames in {secs:.2} s ({:.0} MiB/s each way); \
         splicer CPU during the transfer: {cpu:.3} s",
        64.0 / secs
    );
    drop(c);
    drop(s);

    let line = splicer.close_line_for(client, STEP)?;
    eprintln!("{mode}: {line}");
    for key in ["client_to_upstream", "upstream_to_client"] {
        ensure!(close_num(&line, key)? >= BULK, "{key} below 64 MiB: {line}");
    }
    let kernel = close_num(&line, "kernel_bytes")?;
    if mode == "sockmap" {
        ensure!(
            kernel >= 2 * BULK,
            "sockmap: kernel_bytes < 128 MiB: {line}"
        );
    } else {
        ensure!(kernel == 0, "userspace: kernel_bytes > 0: {line}");
    }
    Ok(())
}

/// A real upgrade through splicer to a WebSocket server written here (the
/// client checks Sec-WebSocket-Accept), then 64 MiB of binary frames each
/// way at once (client frames masked, server frames not): every payload
/// byte arrives in order, both Close frames and EOFs arrive; in sockmap
/// mode the kernel carried ≥ 128 MiB. splicer's CPU time during the
/// transfer is printed, not asserted.
#[test]
fn bulk_ws_frames_each_way() -> Result<()> {
    for mode in MODES {
        bulk_in(mode).with_context(|| format!("offload {mode}"))?;
    }
    Ok(())
}

// ------------------------------------ 7. PROXY headers on a ws listener

/// `--send-proxy` on a ws listener: the PROXY header goes first, then the
/// rewritten request. `--accept-proxy` from a trusted hop: its header names
/// the client, whose address then appears in both.
fn proxy_headers_in(mode: &str) -> Result<()> {
    let dir = scratch(&format!("ws-proxy-{mode}"));
    let (sink_l, sink_addr) = listen_on(BROKER_IP)?;
    let s = ws_tier(
        &dir,
        "splicer",
        mode,
        sink_addr,
        &[
            "--send-proxy",
            "v1",
            "--accept-proxy",
            "v1",
            "--trusted-proxy",
            "127.0.0.2/32",
        ],
    )?;
    let claimed = v4(Ipv4Addr::new(203, 0, 113, 9), 4321);
    let mut req = expected_v1(claimed, s.listen);
    req.extend(upgrade_request(s.listen, "/mqtt", WS_KEY, &[]));
    let mut c = connect_from(CLIENT_IP, s.listen)?;
    c.write_all(&req)?;
    let mut up = accept_within(&sink_l, STEP)?.context("nothing reached the sink")?;
    let header = read_proxy_header(&mut up)?;
    ensure!(
        header == expected_v1(claimed, s.listen),
        "{mode}: PROXY header {}",
        show(&header)
    );
    let (head, rest) = read_head(&mut up)?;
    ensure!(rest.is_empty(), "{mode}: bytes after the head");
    ensure!(
        header_values(&head, "x-forwarded-for") == ["203.0.113.9"],
        "{mode}: {}",
        show(&head)
    );
    ensure!(
        header_values(&head, "x-forwarded-port") == ["4321"],
        "{mode}: {}",
        show(&head)
    );
    Ok(())
}

#[test]
fn proxy_headers_on_a_ws_listener() -> Result<()> {
    MODES.iter().try_for_each(|m| proxy_headers_in(m))
}
