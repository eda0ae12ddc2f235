//! Multi-tier TCP (issue 3): splicer at either tier of a chain of load
//! balancers, with real nginx (stream module) and HAProxy at the other tier,
//! in both offload modes.
//!
//! Every hop has its own loopback address so that trust means something:
//! 127.0.0.2 client, 127.0.0.3 splicer, 127.0.0.4 sink or broker,
//! 127.0.0.5 nginx (listens there and binds its upstream side there too),
//! 127.0.0.6 HAProxy (`source 127.0.0.6`); splicer's own upstream
//! connections come from 127.0.0.1.
//!
//! The "sink" is a TcpListener in the test that reads exactly one PROXY
//! header and then everything else, so the header bytes each hop sends can
//! be compared exactly.
use std::{
    fs,
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener},
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use splicer_tests::*;

const NGINX_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);
const HAPROXY_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// Enough data that the kernel carries most of it in sockmap mode.
const PAYLOAD_LEN: usize = 256 * 1024;

/// MQTT 3.1.1 CONNECT, clean session, keepalive 60, client id "spoof".
const CONNECT: &[u8] = &[
    0x10, 0x11, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x05, b's', b'p',
    b'o', b'o', b'f',
];
/// CONNACK, session not present, accepted.
const CONNACK: &[u8] = &[0x20, 0x02, 0x00, 0x00];
const DISCONNECT: &[u8] = &[0xe0, 0x00];

// ---------------------------------------------------------------- helpers

fn payload(seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; PAYLOAD_LEN];
    Pattern::new(seed).fill(&mut v);
    v
}

/// The header-capturing upstream: accepts one connection, reads exactly one
/// PROXY header, then everything up to EOF. Returns (header, rest).
fn sink(l: &TcpListener) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut s = accept_within(l, STEP)?.context("nothing connected to the sink")?;
    let header = read_proxy_header(&mut s).context("sink: reading the PROXY header")?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .with_context(|| format!("sink: read failed after {} bytes", rest.len()))?;
    Ok((header, rest))
}

/// Client (bound to `from`) → `to` → ... → the sink: sends PAYLOAD_LEN
/// pattern bytes and a FIN, checks the sink got them intact after its
/// header and that the client then sees a clean EOF. Returns the client's
/// address and the header the sink got.
fn send_through(
    from: Ipv4Addr,
    to: SocketAddr,
    sink_l: &TcpListener,
) -> Result<(SocketAddr, Vec<u8>)> {
    let seed = u64::from(to.port());
    let mut c = connect_from(from, to)?;
    let client = local(&c);
    let mut w = c.try_clone()?;
    // Written from a thread: 256 KiB may not fit in the loopback buffers
    // before the sink starts reading.
    let writer = thread::spawn(move || -> std::io::Result<()> {
        w.write_all(&payload(seed))?;
        w.shutdown(Shutdown::Write)
    });
    let (header, rest) = sink(sink_l)?;
    writer.join().unwrap().context("client write")?;
    let want = payload(seed);
    if rest != want {
        let at = rest.iter().zip(&want).position(|(a, b)| a != b);
        bail!(
            "payload after the header differs: got {} bytes, sent {}; first difference at {at:?}",
            rest.len(),
            want.len()
        );
    }
    // The sink closed after EOF; that close comes back as a plain EOF.
    let back = read_to_end_timeout(&mut c, STEP)?;
    ensure!(
        back.is_empty(),
        "client got {} unexpected bytes",
        back.len()
    );
    Ok((client, header))
}

/// nginx as LB 1 as in the guide: `proxy_protocol on` towards `upstream`,
/// its upstream side bound to 127.0.0.5.
fn nginx_lb1(dir: &Path, upstream: SocketAddr) -> Result<(Proc, SocketAddr)> {
    let listen = v4(NGINX_IP, free_port(NGINX_IP));
    let p = start_nginx_stream(
        dir,
        listen,
        &format!(
            "server {{\n  listen {listen};\n  proxy_pass {upstream};\n  \
             proxy_protocol on;\n  proxy_bind {NGINX_IP};\n}}"
        ),
    )?;
    Ok((p, listen))
}

/// HAProxy in the foreground (-db); the config is checked first so that a
/// bad one fails with HAProxy's own message.
fn start_haproxy(dir: &Path, listens: &[SocketAddr], cfg: &str) -> Result<Proc> {
    let path = dir.join("haproxy.cfg");
    fs::write(&path, cfg)?;
    let (st, out, err) =
        run_with_timeout(Command::new("haproxy").arg("-c").arg("-f").arg(&path), STEP)?;
    ensure!(st.success(), "haproxy -c: {st}\n{out}{err}\n{cfg}");
    let mut p = Proc::spawn(
        "haproxy",
        dir,
        Command::new("haproxy").arg("-db").arg("-f").arg(&path),
    )?;
    for a in listens {
        p.wait_listening(*a, STEP)?;
    }
    Ok(p)
}

/// Waits for splicer's close line for `client` and checks its `via=`
/// (None: no via= at all) and, if given, client_to_upstream.
fn check_close(
    s: &Splicer,
    client: SocketAddr,
    via_ip: Option<&str>,
    c2u: Option<usize>,
) -> Result<String> {
    let line = s.close_line_for(client, STEP)?;
    match via_ip {
        Some(ip) => ensure!(
            close_field(&line, "via").is_some_and(|v| v.starts_with(&format!("{ip}:"))),
            "close line should say via={ip}:...: {line}"
        ),
        None => ensure!(
            close_field(&line, "via").is_none(),
            "unexpected via=: {line}"
        ),
    }
    if let Some(n) = c2u {
        ensure!(
            close_field(&line, "client_to_upstream") == Some(n.to_string().as_str()),
            "client_to_upstream should be {n}: {line}"
        );
    }
    Ok(line)
}

// ----------------------------------------------------- aedes and MQTT.js

/// mqtt-client.js from CLIENT_IP to `to`: connects, publishes its own id
/// on t/multitier, disconnects. Returns the client's local port.
fn mqtt_publish(to: SocketAddr, id: &str) -> Result<u16> {
    let out = run_mqtt_client(
        &format!("mqtt://{to}"),
        id,
        &["--publish", "t/multitier", id],
        Duration::from_secs(20),
    )?;
    let connected = client_connected(&out, id)?;
    json_field(connected, "localPort")
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no localPort: {connected}"))
}

/// Checks what aedes decoded for client `id`: the address and port it
/// reports, the PROXY version, and that its TCP peer is splicer.
fn aedes_saw(broker: &mut Proc, id: &str, client: SocketAddr, is_proxy: u32) -> Result<()> {
    let seen = aedes_client(broker, id)?;
    eprintln!("aedes: {seen}");
    let field = |f: &str| json_field(&seen, f).unwrap_or_default();
    ensure!(
        field("ip") == client.ip().to_string(),
        "ip should be {}: {seen}",
        client.ip()
    );
    ensure!(
        field("port") == client.port().to_string(),
        "port should be {}: {seen}",
        client.port()
    );
    ensure!(
        field("isProxy") == is_proxy.to_string(),
        "isProxy should be {is_proxy}: {seen}"
    );
    ensure!(
        field("socketIp") == "127.0.0.1",
        "aedes' TCP peer is not splicer: {seen}"
    );
    Ok(())
}

fn aedes_got_publish(broker: &mut Proc, id: &str) -> Result<()> {
    wait_json_line(
        broker,
        |l| {
            is_event(l, "publish")
                && json_field(l, "client").as_deref() == Some(id)
                && json_field(l, "topic").as_deref() == Some("t/multitier")
                && json_field(l, "payload").as_deref() == Some(id)
        },
        STEP,
    )
    .map(drop)
}

// --------------------------------------------------- hand-parsed PROXY v2

struct V2 {
    src: SocketAddr,
    dst: SocketAddr,
    tlvs: Vec<(u8, Vec<u8>)>,
}

/// Parses a PROXY v2 PROXY/TCP4 header by hand (independent of splicer's
/// parser), bounds-checking every TLV against the header length.
fn parse_v2(h: &[u8]) -> Result<V2> {
    ensure!(
        h.len() >= 16 && h[..12] == *b"\r\n\r\n\0\r\nQUIT\n",
        "no v2 signature: {}",
        show(h)
    );
    ensure!(h[12] == 0x21, "ver/cmd {:#04x}, want 0x21", h[12]);
    ensure!(
        h[13] == 0x11,
        "family {:#04x}, want 0x11 (TCP over IPv4)",
        h[13]
    );
    let len = usize::from(u16::from_be_bytes([h[14], h[15]]));
    ensure!(
        h.len() == 16 + len,
        "length field {len}, header is {} bytes",
        h.len()
    );
    ensure!(len >= 12, "length {len} too short for IPv4 addresses");
    let b = &h[16..];
    let ip = |i: usize| Ipv4Addr::new(b[i], b[i + 1], b[i + 2], b[i + 3]);
    let port = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let (src, dst) = (v4(ip(0), port(8)), v4(ip(4), port(10)));
    let mut tlvs = Vec::new();
    let mut rest = &b[12..];
    while !rest.is_empty() {
        ensure!(rest.len() >= 3, "truncated TLV header: {}", show(rest));
        let n = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        ensure!(
            rest.len() >= 3 + n,
            "TLV {:#04x} of {n} bytes runs past the header",
            rest[0]
        );
        tlvs.push((rest[0], rest[3..3 + n].to_vec()));
        rest = &rest[3 + n..];
    }
    Ok(V2 { src, dst, tlvs })
}

fn tlv(h: &V2, typ: u8) -> Option<&[u8]> {
    h.tlvs
        .iter()
        .find(|(t, _)| *t == typ)
        .map(|(_, v)| v.as_slice())
}

// ---------------------------------------------- 1. passthrough behind nginx

fn passthrough_behind_nginx_in(mode: &str) -> Result<()> {
    let args = [
        "--accept-proxy",
        "auto",
        "--trusted-proxy",
        "127.0.0.5/32",
        "--proxy-passthrough",
    ];
    // Sink: the header nginx wrote must come out of splicer byte for byte.
    {
        let dir = scratch(&format!("multitier-pass-{mode}"));
        let (sink_l, sink_addr) = listen_on(BROKER_IP)?;
        let splicer = splicer_in_mode(&dir, mode, sink_addr, &args)?;
        let (_nginx, nginx_addr) = nginx_lb1(&dir, splicer.listen)?;
        let (client, header) = send_through(CLIENT_IP, nginx_addr, &sink_l)?;
        let want = format!(
            "PROXY TCP4 127.0.0.2 {} {} {}\r\n",
            nginx_addr.ip(),
            client.port(),
            nginx_addr.port()
        );
        ensure!(
            header == want.as_bytes(),
            "sink got header {:?}, nginx sent {:?}",
            show(&header),
            show(want.as_bytes())
        );
        let line = check_close(&splicer, client, Some("127.0.0.5"), Some(PAYLOAD_LEN))?;
        eprintln!("{mode}: {line}");
    }
    // aedes: the passed-through v1 header tells it the client's address.
    {
        let dir = scratch(&format!("multitier-pass-aedes-{mode}"));
        let (mut broker, broker_addr) = start_aedes(&dir)?;
        mqtt_via_nginx(
            &dir,
            mode,
            (&mut broker, broker_addr),
            &args,
            &format!("pass-{mode}"),
            1,
        )?;
    }
    Ok(())
}

/// MQTT.js (from CLIENT_IP) → nginx LB 1 → splicer with `args` → aedes:
/// aedes reports the client's own address and port, with the PROXY
/// `version` it got, and the publish arrives; splicer's close line names
/// the client and nginx as the hop.
fn mqtt_via_nginx(
    dir: &Path,
    mode: &str,
    (broker, broker_addr): (&mut Proc, SocketAddr),
    args: &[&str],
    id: &str,
    version: u32,
) -> Result<()> {
    let splicer = splicer_in_mode(dir, mode, broker_addr, args)?;
    let (_nginx, nginx_addr) = nginx_lb1(dir, splicer.listen)?;
    let port = mqtt_publish(nginx_addr, id)?;
    let client = v4(CLIENT_IP, port);
    aedes_saw(broker, id, client, version)?;
    aedes_got_publish(broker, id)?;
    check_close(&splicer, client, Some("127.0.0.5"), None)?;
    Ok(())
}

/// client → nginx (`proxy_protocol on`) → splicer `--proxy-passthrough` →
/// sink / aedes: the sink gets nginx's header verbatim and the payload
/// intact; aedes reports the client's address and port; splicer's close
/// line names the client and nginx as the hop.
#[test]
fn passthrough_behind_nginx() -> Result<()> {
    for mode in MODES {
        passthrough_behind_nginx_in(mode).with_context(|| format!("offload {mode}"))?;
    }
    Ok(())
}

// --------------------------------------------------- 2. re-emit behind nginx

fn reemit_behind_nginx_in(mode: &str) -> Result<()> {
    let aedes_dir = scratch(&format!("multitier-reemit-aedes-{mode}"));
    let (mut broker, broker_addr) = start_aedes(&aedes_dir)?;
    for (send_proxy, version) in [("v1", 1), ("v2", 2)] {
        let args = [
            "--accept-proxy",
            "auto",
            "--trusted-proxy",
            "127.0.0.5/32",
            "--send-proxy",
            send_proxy,
        ];
        // Sink: a new header, real client as source, splicer as destination.
        {
            let dir = scratch(&format!("multitier-reemit-{mode}-{send_proxy}"));
            let (sink_l, sink_addr) = listen_on(BROKER_IP)?;
            let splicer = splicer_in_mode(&dir, mode, sink_addr, &args)?;
            let (_nginx, nginx_addr) = nginx_lb1(&dir, splicer.listen)?;
            let (client, header) = send_through(CLIENT_IP, nginx_addr, &sink_l)?;
            let want = match version {
                1 => expected_v1(client, splicer.listen),
                _ => expected_v2(client, splicer.listen),
            };
            ensure!(
                header == want,
                "{send_proxy}: sink got {:?}, want {:?}",
                show(&header),
                show(&want)
            );
            check_close(&splicer, client, Some("127.0.0.5"), Some(PAYLOAD_LEN))?;
        }
        // aedes: the client's address, not nginx's 127.0.0.5.
        {
            let dir = scratch(&format!("multitier-reemit-mqtt-{mode}-{send_proxy}"));
            let id = format!("reemit-{mode}-{send_proxy}");
            mqtt_via_nginx(&dir, mode, (&mut broker, broker_addr), &args, &id, version)?;
        }
    }
    Ok(())
}

/// client → nginx (`proxy_protocol on`) → splicer re-emitting v1 / v2 →
/// sink / aedes: the header names the client as source and splicer's
/// listen address as destination (exact bytes); aedes reports 127.0.0.2.
#[test]
fn reemit_behind_nginx() -> Result<()> {
    for mode in MODES {
        reemit_behind_nginx_in(mode).with_context(|| format!("offload {mode}"))?;
    }
    Ok(())
}

// ----------------------------------------- 3. splicer in front of nginx

fn splicer_in_front_of_nginx_in(mode: &str) -> Result<()> {
    let dir = scratch(&format!("multitier-front-{mode}"));
    let (sink_l, sink_addr) = listen_on(BROKER_IP)?;
    let nginx_addr = v4(NGINX_IP, free_port(NGINX_IP));
    let access = dir.join("nginx-access.log");
    // nginx as LB 2 of the guide's non-passthrough set-up, trusting splicer
    // (whose upstream connections come from 127.0.0.1).
    let _nginx = start_nginx_stream(
        &dir,
        nginx_addr,
        &format!(
            "log_format pp '$proxy_protocol_addr $proxy_protocol_port $remote_addr \
             $remote_port $realip_remote_addr';\n\
             server {{\n  listen {nginx_addr} proxy_protocol;\n  \
             set_real_ip_from 127.0.0.1;\n  proxy_pass {sink_addr};\n  \
             proxy_protocol on;\n  proxy_bind {NGINX_IP};\n  \
             access_log {} pp;\n}}",
            access.display()
        ),
    )?;
    let splicer = splicer_in_mode(&dir, mode, nginx_addr, &["--send-proxy", "v1"])?;
    let (client, header) = send_through(CLIENT_IP, splicer.listen, &sink_l)?;
    // nginx's header: the client from splicer's header, nginx as destination.
    let want = format!(
        "PROXY TCP4 127.0.0.2 {} {} {}\r\n",
        nginx_addr.ip(),
        client.port(),
        nginx_addr.port()
    );
    ensure!(
        header == want.as_bytes(),
        "sink got {:?} from nginx, want {:?}",
        show(&header),
        show(want.as_bytes())
    );
    // nginx logs a stream session when it ends, which it has by now.
    let want_log = format!("127.0.0.2 {p} 127.0.0.2 {p} 127.0.0.1", p = client.port());
    let deadline = Instant::now() + STEP;
    loop {
        let log = fs::read_to_string(&access).unwrap_or_default();
        if !log.is_empty() {
            ensure!(
                log.lines().collect::<Vec<_>>() == [want_log.as_str()],
                "nginx access log:\n{log}want (proxy_protocol_addr/port, remote_addr/port, \
                 realip_remote_addr):\n{want_log}"
            );
            break;
        }
        ensure!(Instant::now() < deadline, "nginx logged no session");
        thread::sleep(Duration::from_millis(20));
    }
    check_close(&splicer, client, None, Some(PAYLOAD_LEN))?;
    Ok(())
}

/// client → splicer (`--send-proxy v1`) → nginx (`listen ... proxy_protocol;
/// set_real_ip_from; proxy_protocol on`) → sink: nginx's access log shows
/// 127.0.0.2 as both $proxy_protocol_addr and $remote_addr (and splicer's
/// 127.0.0.1 as $realip_remote_addr), and the header nginx sends on names
/// the client's address and port.
#[test]
fn splicer_in_front_of_nginx() -> Result<()> {
    for mode in MODES {
        splicer_in_front_of_nginx_in(mode).with_context(|| format!("offload {mode}"))?;
    }
    Ok(())
}

// --------------------------------------- 4. HAProxy v2 TLVs through splicer

fn haproxy_v2_tlv_kept_in(mode: &str) -> Result<()> {
    let dir = scratch(&format!("multitier-haproxy-{mode}"));
    let (direct_l, direct_addr) = listen_on(BROKER_IP)?;
    let (sink_l, sink_addr) = listen_on(BROKER_IP)?;
    let splicer = splicer_in_mode(
        &dir,
        mode,
        sink_addr,
        &[
            "--accept-proxy",
            "v2",
            "--trusted-proxy",
            "127.0.0.6/32",
            "--send-proxy",
            "v2",
        ],
    )?;
    // Two frontends with the same server options: one straight to a sink
    // (what HAProxy sends), one through splicer. The unique id is computed
    // from the client's address, so its value is known in advance.
    let fe_direct = v4(HAPROXY_IP, free_port(HAPROXY_IP));
    let fe_splicer = v4(HAPROXY_IP, free_port(HAPROXY_IP));
    let server = format!("send-proxy-v2 proxy-v2-options unique-id,crc32c source {HAPROXY_IP}");
    let _haproxy = start_haproxy(
        &dir,
        &[fe_direct, fe_splicer],
        &format!(
            "global\n  log stderr format raw local0 info\n\
             defaults\n  mode tcp\n  log global\n  timeout connect 5s\n  \
             timeout client 30s\n  timeout server 30s\n  unique-id-format uid-%ci-%cp\n\
             listen direct\n  bind {fe_direct}\n  server s1 {direct_addr} {server}\n\
             listen via_splicer\n  bind {fe_splicer}\n  server s1 {} {server}\n",
            splicer.listen
        ),
    )?;
    let uid = |c: SocketAddr| format!("uid-{}-{}", c.ip(), c.port());

    // The control: HAProxy's own header has the unique id and a CRC32C.
    let (client, header) = send_through(CLIENT_IP, fe_direct, &direct_l)?;
    let h = parse_v2(&header).with_context(|| format!("HAProxy's header {}", show(&header)))?;
    ensure!(
        h.src == client && h.dst == fe_direct,
        "HAProxy's header addresses {} -> {}",
        h.src,
        h.dst
    );
    ensure!(
        tlv(&h, 0x05) == Some(uid(client).as_bytes()),
        "HAProxy sent no UNIQUE_ID {:?}: {}",
        uid(client),
        show(&header)
    );
    ensure!(
        tlv(&h, 0x03).is_some(),
        "HAProxy sent no CRC32C: {}",
        show(&header)
    );
    let haproxy_types: Vec<u8> = h.tlvs.iter().map(|(t, _)| *t).collect();

    // Through splicer: re-emitted with splicer as destination, the unique id
    // kept, the CRC32C (which would no longer match) dropped.
    let (client, header) = send_through(CLIENT_IP, fe_splicer, &sink_l)?;
    let h = parse_v2(&header).with_context(|| format!("splicer's header {}", show(&header)))?;
    eprintln!("{mode}: splicer re-emitted {}", show(&header));
    ensure!(
        h.src == client,
        "source {} is not the client {client}",
        h.src
    );
    ensure!(
        h.dst == splicer.listen,
        "destination {} is not splicer's {}",
        h.dst,
        splicer.listen
    );
    ensure!(
        tlv(&h, 0x05) == Some(uid(client).as_bytes()),
        "UNIQUE_ID {:?} not kept: {}",
        uid(client),
        show(&header)
    );
    let types: Vec<u8> = h.tlvs.iter().map(|(t, _)| *t).collect();
    let kept: Vec<u8> = haproxy_types
        .into_iter()
        .filter(|t| *t != 0x03 && *t != 0x04)
        .collect();
    ensure!(
        types == kept,
        "TLV types {types:02x?}, want HAProxy's minus CRC32C/NOOP: {kept:02x?}"
    );
    check_close(&splicer, client, Some("127.0.0.6"), Some(PAYLOAD_LEN))?;
    Ok(())
}

/// client → HAProxy (`send-proxy-v2`, `proxy-v2-options unique-id,crc32c`)
/// → splicer (`--accept-proxy v2 --send-proxy v2`) → sink: the hand-parsed
/// v2 header has the client as source, splicer as destination, and
/// HAProxy's UNIQUE_ID TLV with its value; CRC32C is dropped.
#[test]
fn haproxy_v2_tlv_kept() -> Result<()> {
    for mode in MODES {
        haproxy_v2_tlv_kept_in(mode).with_context(|| format!("offload {mode}"))?;
    }
    Ok(())
}

// ------------------------------------------------------- 5. spoofing

/// Sends `header` + CONNECT in one write from `from` to splicer, and acts as
/// the broker at the sink: checks the CONNECT arrived intact right after
/// splicer's header and answers CONNACK, which the client must get.
/// Returns (client address, header the sink got).
fn mqtt_through_sink(
    from: Ipv4Addr,
    to: SocketAddr,
    header: &[u8],
    sink_l: &TcpListener,
) -> Result<(SocketAddr, Vec<u8>)> {
    let mut c = connect_from(from, to)?;
    c.write_all(&[header, CONNECT].concat())?;
    let mut s = accept_within(sink_l, STEP)?.context("nothing reached the sink")?;
    let got = read_proxy_header(&mut s)?;
    let mut connect = [0u8; CONNECT.len()];
    s.read_exact(&mut connect).context("sink: CONNECT")?;
    ensure!(
        connect == CONNECT,
        "CONNECT changed on the way: {}",
        show(&connect)
    );
    s.write_all(CONNACK)?;
    let mut connack = [0u8; 4];
    c.read_exact(&mut connack).context("client: CONNACK")?;
    ensure!(
        connack == CONNACK,
        "client got {} for CONNACK",
        show(&connack)
    );
    c.write_all(DISCONNECT)?;
    c.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    ensure!(
        rest == DISCONNECT,
        "sink got {} after CONNECT, want DISCONNECT",
        show(&rest)
    );
    drop(s);
    ensure!(
        read_to_end_timeout(&mut c, STEP)?.is_empty(),
        "client got extra bytes"
    );
    Ok((local(&c), got))
}

fn spoof_header(port: u16) -> Vec<u8> {
    format!("PROXY TCP4 1.2.3.4 127.0.0.3 1111 {port}\r\n").into_bytes()
}

fn untrusted_ignored(mode: &str) -> Result<()> {
    let args = [
        "--accept-proxy",
        "auto",
        "--trusted-proxy",
        "127.0.0.5/32",
        "--untrusted-proxy",
        "ignore",
        "--send-proxy",
        "v1",
    ];
    // Sink: splicer's header names the peer; the claim is nowhere.
    {
        let dir = scratch(&format!("multitier-spoof-ignore-{mode}"));
        let (sink_l, sink_addr) = listen_on(BROKER_IP)?;
        let splicer = splicer_in_mode(&dir, mode, sink_addr, &args)?;
        let (client, header) = mqtt_through_sink(
            CLIENT_IP,
            splicer.listen,
            &spoof_header(splicer.listen.port()),
            &sink_l,
        )?;
        let want = expected_v1(client, splicer.listen);
        ensure!(
            header == want,
            "sink got {:?}, want {:?}",
            show(&header),
            show(&want)
        );
        let warn = splicer
            .proc
            .lines_with("PROXY header from an untrusted peer ignored");
        ensure!(
            warn.len() == 1 && warn[0].contains(&client.to_string()),
            "want one untrusted-peer warning for {client}:\n{}",
            splicer.proc.output()
        );
        check_close(&splicer, client, None, None)?;
    }
    // aedes decodes the header splicer sent: the peer, never 1.2.3.4.
    {
        let dir = scratch(&format!("multitier-spoof-aedes-{mode}"));
        let (mut broker, broker_addr) = start_aedes(&dir)?;
        let splicer = splicer_in_mode(&dir, mode, broker_addr, &args)?;
        let mut c = connect_from(CLIENT_IP, splicer.listen)?;
        let client = local(&c);
        c.write_all(&[&spoof_header(splicer.listen.port())[..], CONNECT].concat())?;
        let mut connack = [0u8; 4];
        c.read_exact(&mut connack).context("CONNACK from aedes")?;
        ensure!(connack == CONNACK, "aedes answered {}", show(&connack));
        aedes_saw(&mut broker, "spoof", client, 1)?;
        c.write_all(DISCONNECT)?;
        drop(c);
        check_close(&splicer, client, None, None)?;
        ensure!(
            !broker.output().contains("1.2.3.4"),
            "the spoofed address reached aedes:\n{}",
            broker.output()
        );
    }
    Ok(())
}

fn untrusted_rejected(mode: &str) -> Result<()> {
    let dir = scratch(&format!("multitier-spoof-reject-{mode}"));
    let (sink_l, sink_addr) = listen_on(BROKER_IP)?;
    let mut splicer = splicer_in_mode(
        &dir,
        mode,
        sink_addr,
        &[
            "--accept-proxy",
            "auto",
            "--trusted-proxy",
            "127.0.0.5/32",
            "--untrusted-proxy",
            "reject",
            "--send-proxy",
            "v1",
        ],
    )?;
    let mut c = connect_from(CLIENT_IP, splicer.listen)?;
    let client = local(&c);
    c.write_all(&[&spoof_header(splicer.listen.port())[..], CONNECT].concat())?;
    // Closed without an answer: EOF, or a reset (the CONNECT was unread).
    let mut back = Vec::new();
    match c.read_to_end(&mut back) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => bail!("client: {e} (splicer did not close the connection)"),
    }
    ensure!(back.is_empty(), "rejected client got {}", show(&back));
    ensure!(
        accept_within(&sink_l, Duration::from_secs(1))?.is_none(),
        "a rejected connection reached the upstream"
    );
    splicer
        .proc
        .wait_line(&format!("{client}: rejected: "), STEP)?;
    // The same splicer still serves a trusted hop (127.0.0.5), so the
    // rejection was about trust, not about every header.
    let claimed = v4(Ipv4Addr::new(10, 1, 1, 1), 3333);
    let (_, header) = mqtt_through_sink(
        NGINX_IP,
        splicer.listen,
        &expected_v1(claimed, splicer.listen),
        &sink_l,
    )?;
    let want = expected_v1(claimed, splicer.listen);
    ensure!(
        header == want,
        "trusted hop: sink got {:?}, want {:?}",
        show(&header),
        show(&want)
    );
    // Exactly one close line: the trusted connection's (a rejected one
    // never gets as far as an upstream, so it has none).
    let closed = splicer.wait_closed(1, STEP)?;
    ensure!(
        closed.len() == 1 && closed[0].contains("client=10.1.1.1:3333 via=127.0.0.5:"),
        "want only the trusted connection's close line:\n{}",
        splicer.proc.output()
    );
    Ok(())
}

/// A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d: trust must
/// still match 127.0.0.5/32 for exactly 127.0.0.5.
fn ipv4_mapped(mode: &str) -> Result<()> {
    let dir = scratch(&format!("multitier-mapped-{mode}"));
    let (sink_l, sink_addr) = listen_on(BROKER_IP)?;
    let port = loop {
        let p = free_port(SPLICER_IP);
        if TcpListener::bind(("::", p)).is_ok() {
            break p;
        }
    };
    let mut cmd = Command::new(splicer_bin());
    cmd.args([
        "--listen",
        &format!("[::]:{port}"),
        "--upstream",
        &sink_addr.to_string(),
    ])
    .args(["--offload", mode, "--accept-proxy", "auto"])
    .args(["--trusted-proxy", "127.0.0.5/32", "--send-proxy", "v2"]);
    let splicer = Splicer::start_cmd(&dir, cmd, v4(SPLICER_IP, port))?;
    ensure!(
        splicer.offload() == mode,
        "offload {:?}, want {mode}",
        splicer.offload()
    );
    // The claimed destination differs from splicer's, so a re-emitted
    // header (destination 127.0.0.3:port) is told from a copy.
    let claim = b"PROXY TCP4 10.9.9.9 10.0.0.1 2222 1883\r\n";
    let listen = v4(SPLICER_IP, port);

    let (_, header) = mqtt_through_sink(NGINX_IP, listen, claim, &sink_l)?;
    let want = expected_v2(v4(Ipv4Addr::new(10, 9, 9, 9), 2222), listen);
    ensure!(
        header == want,
        "trusted mapped peer: sink got {:?}, want {:?}",
        show(&header),
        show(&want)
    );

    let (client, header) = mqtt_through_sink(CLIENT_IP, listen, claim, &sink_l)?;
    let want = expected_v2(client, listen);
    ensure!(
        header == want,
        "untrusted mapped peer: sink got {:?}, want {:?}",
        show(&header),
        show(&want)
    );
    ensure!(
        splicer.proc.lines_with("untrusted peer ignored").len() == 1,
        "want one untrusted warning (for 127.0.0.2):\n{}",
        splicer.proc.output()
    );
    for l in splicer.wait_closed(2, STEP)? {
        eprintln!("{mode} dual-stack: {l}");
    }
    // Close lines name the real clients. splicer may print a mapped peer
    // as [::ffff:a.b.c.d] (a cosmetic difference), so compare unmapped.
    let unmapped = |a: SocketAddr| match a.ip() {
        IpAddr::V6(ip) => ip.to_ipv4_mapped().map_or(a, |ip| v4(ip, a.port())),
        _ => a,
    };
    let clients: Vec<SocketAddr> = splicer
        .closed_lines()
        .iter()
        .filter_map(|l| close_field(l, "client")?.parse().ok())
        .map(unmapped)
        .collect();
    ensure!(
        clients == [v4(Ipv4Addr::new(10, 9, 9, 9), 2222), client],
        "close lines name clients {clients:?}"
    );
    Ok(())
}

/// An untrusted peer's PROXY header: with `ignore`, the sink and aedes see
/// the peer's own 127.0.0.2 (never 1.2.3.4), the MQTT bytes after the
/// header arrive intact and a warning is logged; with `reject`, nothing
/// reaches the upstream and `rejected:` is logged, while a trusted hop
/// still gets through. On a dual-stack listener (IPv4-mapped peers),
/// 127.0.0.5 is trusted and 127.0.0.2 is not.
#[test]
fn spoofed_header_never_reaches_the_broker() -> Result<()> {
    for mode in MODES {
        untrusted_ignored(mode).with_context(|| format!("offload {mode}, ignore"))?;
        untrusted_rejected(mode).with_context(|| format!("offload {mode}, reject"))?;
        ipv4_mapped(mode).with_context(|| format!("offload {mode}, dual stack"))?;
    }
    Ok(())
}
