//! Real MQTT peers through splicer, in both offload modes: mosquitto with
//! mosquitto_pub/mosquitto_sub, and an aedes broker (with
//! aedes-protocol-decoder) with MQTT.js clients, to check the PROXY header
//! splicer sends is what a real broker decodes.
use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use anyhow::{bail, ensure, Context as _, Result};
use splicer_tests::*;

// ---------------------------------------------------------------- helpers

/// Starts mosquitto on BROKER_IP:<free port>. It logs everything to stderr
/// (unbuffered, unlike its stdout) so the test can follow CONNECT,
/// SUBSCRIBE and PUBLISH as the broker handles them.
fn start_mosquitto(dir: &Path) -> Result<(Proc, SocketAddr)> {
    let addr = v4(BROKER_IP, free_port(BROKER_IP));
    // mosquitto 2.x only listens on loopback without an explicit listener.
    let conf = format!(
        "listener {} {}\nallow_anonymous true\npersistence false\n\
         log_dest stderr\nlog_type all\n",
        addr.port(),
        addr.ip()
    );
    match spawn_mosquitto(dir, &conf, addr)? {
        Ok(broker) => Ok((broker, addr)),
        Err((st, out)) => bail!("mosquitto exited ({st}):\n{out}"),
    }
}

/// The MQTT.js client peer, connecting to splicer from CLIENT_IP.
fn client_cmd(splicer: &Splicer, id: &str, args: &[&str]) -> Command {
    mqtt_client_cmd(&format!("mqtt://{}", splicer.listen), id, args)
}

/// Runs the MQTT.js client to completion; fails unless it exits 0.
/// Returns its stdout (JSON lines).
fn run_client(splicer: &Splicer, id: &str, args: &[&str]) -> Result<String> {
    run_mqtt_client(
        &format!("mqtt://{}", splicer.listen),
        id,
        args,
        Duration::from_secs(20),
    )
}

/// Lines of JSON output whose "event" is `event`.
fn events<'a>(out: &'a str, event: &str) -> Vec<&'a str> {
    out.lines().filter(|l| is_event(l, event)).collect()
}

// ------------------------------------------------ 1. mosquitto pub/sub

/// `protocol` is splicer's listener protocol (tcp, or mqtt: the CONNECT
/// read first), `version` the clients' MQTT version (mosquitto's -V).
fn mosquitto_pub_sub(mode: &str, protocol: &str, version: &str) -> Result<()> {
    let dir = scratch(&format!("mqtt-mosquitto-{mode}-{protocol}-{version}"));
    let (mut broker, broker_addr) = start_mosquitto(&dir)?;
    // mosquitto does not read PROXY headers.
    let splicer = splicer_in_mode(&dir, mode, broker_addr, &["--send-proxy", "off", "--protocol", protocol])?;
    let (host, port) = (SPLICER_IP.to_string(), splicer.listen.port().to_string());
    let bind = CLIENT_IP.to_string();
    let mut ids = Vec::new();
    for qos in ["0", "1"] {
        let topic = format!("splicer-e2e/{mode}/qos{qos}");
        let sub_id = format!("sub-{mode}-q{qos}");
        let mut sub = Proc::spawn_apart(
            &sub_id,
            &dir,
            Command::new("mosquitto_sub")
                .args(["-h", &host, "-p", &port, "-A", &bind, "-i", &sub_id, "-V", version])
                .args(["-t", &topic, "-q", qos, "-C", "3", "-v"]),
        )?;
        ids.push(sub_id.clone());
        // The broker logs the SUBACK once the subscription is in place.
        broker
            .wait_line(&format!("Sending SUBACK to {sub_id}"), STEP)
            .with_context(|| format!("subscriber: {}", sub.stderr()))?;
        let msgs: Vec<String> = (1..=3).map(|i| format!("{mode}-qos{qos}-msg{i}")).collect();
        for (i, msg) in msgs.iter().enumerate() {
            let pub_id = format!("pub-{mode}-q{qos}-{i}");
            let (st, out, err) = run_with_timeout(
                Command::new("mosquitto_pub")
                    .args(["-h", &host, "-p", &port, "-A", &bind, "-i", &pub_id, "-V", version])
                    .args(["-t", &topic, "-q", qos, "-m", msg]),
                STEP,
            )?;
            ensure!(st.success(), "mosquitto_pub {pub_id}: {st}\n{out}{err}");
            ids.push(pub_id.clone());
            // Each publisher is its own connection through splicer; wait for
            // the broker to have this one before the next, so the order is
            // defined even at QoS 0.
            broker.wait_line(&format!("Received PUBLISH from {pub_id} "), STEP)?;
        }
        let st = sub.wait_exit(STEP)?;
        let (out, err) = (sub.output(), sub.stderr());
        let want: String = msgs.iter().map(|m| format!("{topic} {m}\n")).collect();
        ensure!(
            out == want,
            "qos {qos}: subscriber printed\n{out:?}\nexpected\n{want:?}\nstderr: {err}"
        );
        ensure!(st.success(), "qos {qos}: mosquitto_sub exited {st}: {err}");
    }

    // The broker saw every client arrive from splicer's side (127.0.0.1),
    // not from the clients' own 127.0.0.2.
    for id in &ids {
        let line = broker.wait_line(&format!(" as {id} "), STEP)?;
        ensure!(
            line.contains("connected from 127.0.0.1:"),
            "{id} did not reach mosquitto through splicer: {line}"
        );
    }
    // And splicer logged one close line per connection.
    let closed = splicer.wait_closed(ids.len(), STEP)?;
    for l in &closed {
        eprintln!("{mode}: {l}");
    }
    ensure!(
        closed.len() == ids.len(),
        "{} close lines for {} connections:\n{}",
        closed.len(),
        ids.len(),
        closed.join("\n")
    );
    let up = broker_addr.to_string();
    for l in &closed {
        ensure!(
            close_field(l, "client").is_some_and(|c| c.starts_with("127.0.0.2:"))
                && close_field(l, "upstream") == Some(up.as_str()),
            "unexpected close line: {l}"
        );
        // every MQTT session sends CONNECT and receives CONNACK
        ensure!(
            close_num(l, "client_to_upstream")? > 0 && close_num(l, "upstream_to_client")? > 0,
            "no traffic in close line: {l}"
        );
        // An MQTT listener names who connected.
        if protocol == "mqtt" {
            let id = close_field(l, "client_id").unwrap_or_default().trim_matches('"');
            let v = if version == "5" { "5.0" } else { "3.1.1" };
            ensure!(
                ids.iter().any(|i| i == id) && close_field(l, "mqtt_version") == Some(v),
                "close line without the client's ID or version {v}: {l}"
            );
        }
    }
    check_kernel_bytes(&closed, mode, false)
}

/// mosquitto_sub receives, in order, exactly what mosquitto_pub sent
/// through splicer, at QoS 0 and QoS 1: MQTT 3.1.1 through a plain TCP
/// listener, and MQTT 3.1.1 and 5 through `protocol = "mqtt"`.
#[test]
fn mosquitto_pub_sub_through_splicer() -> Result<()> {
    for mode in MODES {
        for (protocol, version) in [("tcp", "311"), ("mqtt", "311"), ("mqtt", "5")] {
            mosquitto_pub_sub(mode, protocol, version)
                .with_context(|| format!("offload {mode}, protocol {protocol}, MQTT {version}"))?;
        }
    }
    Ok(())
}

// ------------------------------------ 2. aedes decodes the PROXY header

/// One client through a splicer with `--send-proxy send_proxy`; checks the
/// address aedes reports for it. `is_proxy` is the header version expected,
/// None for no header (then aedes must see splicer's own address).
fn aedes_client_address(
    mode: &str,
    broker: &mut Proc,
    broker_addr: SocketAddr,
    send_proxy: &str,
    is_proxy: Option<u32>,
    protocol: &str,
) -> Result<()> {
    let dir = scratch(&format!("mqtt-aedes-{mode}-{send_proxy}-{protocol}"));
    let splicer = splicer_in_mode(&dir, mode, broker_addr, &["--send-proxy", send_proxy, "--protocol", protocol])?;
    let id = format!("addr-{mode}-{send_proxy}-{protocol}");
    let out = run_client(&splicer, &id, &["--publish", "t/x", "hello"])?;
    let connected = client_connected(&out, &id)?;
    let local_port = json_field(connected, "localPort").context("no localPort")?;

    let seen = aedes_client(broker, &id)?;
    eprintln!("{mode} send-proxy {send_proxy}: {seen}");
    let field = |f: &str| json_field(&seen, f).unwrap_or_default();
    // The broker's TCP peer is always splicer...
    ensure!(
        field("socketIp") == "127.0.0.1",
        "TCP peer is not splicer: {seen}"
    );
    // ...and the address it reports comes from the header, if any.
    match is_proxy {
        Some(v) => {
            ensure!(field("ip") == "127.0.0.2", "ip: {seen}");
            ensure!(
                field("port") == local_port,
                "port (client's is {local_port}): {seen}"
            );
            ensure!(
                field("isProxy") == v.to_string(),
                "isProxy (want {v}): {seen}"
            );
        }
        None => {
            ensure!(field("ip") == "127.0.0.1", "ip without a header: {seen}");
            ensure!(field("isProxy") == "0", "isProxy without a header: {seen}");
        }
    }
    // MQTT after the header got through too.
    wait_json_line(
        broker,
        |l| {
            is_event(l, "publish")
                && json_field(l, "client").as_deref() == Some(id.as_str())
                && json_field(l, "topic").as_deref() == Some("t/x")
                && json_field(l, "payload").as_deref() == Some("hello")
        },
        STEP,
    )?;
    let closed = splicer.wait_closed(1, STEP)?;
    ensure!(
        close_field(&closed[0], "client") == Some(format!("127.0.0.2:{local_port}").as_str()),
        "close line is not for the client at 127.0.0.2:{local_port}: {}",
        closed[0]
    );
    Ok(())
}

/// aedes-protocol-decoder resolves the PROXY v1/v2 header splicer sends to
/// the real client address and port; without a header (the negative
/// control) it sees splicer's 127.0.0.1.
#[test]
fn aedes_sees_real_client_address_with_proxy_header() -> Result<()> {
    for mode in MODES {
        let dir = scratch(&format!("mqtt-aedes-{mode}"));
        let (mut broker, broker_addr) = start_aedes(&dir)?;
        for (send_proxy, is_proxy, protocol) in
            [("v1", Some(1), "tcp"), ("v2", Some(2), "tcp"), ("v2", Some(2), "mqtt"), ("off", None, "tcp")]
        {
            aedes_client_address(mode, &mut broker, broker_addr, send_proxy, is_proxy, protocol)
                .with_context(|| format!("offload {mode}, --send-proxy {send_proxy}, protocol {protocol}"))?;
        }
    }
    Ok(())
}

// ------------------------------- 3. QoS 1 round trip through splicer

fn roundtrip(mode: &str, protocol: &str) -> Result<()> {
    let dir = scratch(&format!("mqtt-roundtrip-{mode}-{protocol}"));
    let (_broker, broker_addr) = start_aedes(&dir)?;
    let splicer = splicer_in_mode(&dir, mode, broker_addr, &["--send-proxy", "v2", "--protocol", protocol])?;
    let sub_id = format!("rt-sub-{mode}");
    let mut sub = Proc::spawn_apart(
        &sub_id,
        &dir,
        &mut client_cmd(
            &splicer,
            &sub_id,
            &[
                "--subscribe",
                "t/rt",
                "--count",
                "2",
                "--qos",
                "1",
                "--timeout-ms",
                "20000",
            ],
        ),
    )?;
    // The client prints `subscribed` after its SUBACK.
    sub.wait_line("\"event\":\"subscribed\"", STEP)?;
    let payloads = [format!("{mode}-one"), format!("{mode}-two")];
    let out = run_client(
        &splicer,
        &format!("rt-pub-{mode}"),
        &[
            "--publish",
            "t/rt",
            &payloads[0],
            "--publish",
            "t/rt",
            &payloads[1],
            "--qos",
            "1",
        ],
    )?;
    // At QoS 1 `published` means the broker acked it.
    ensure!(events(&out, "published").len() == 2, "publisher:\n{out}");
    let st = sub.wait_exit(Duration::from_secs(25))?;
    let (out, err) = (sub.output(), sub.stderr());
    let got: Vec<(String, String)> = events(&out, "message")
        .iter()
        .map(|l| {
            (
                json_field(l, "topic").unwrap_or_default(),
                json_field(l, "payload").unwrap_or_default(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = payloads
        .iter()
        .map(|p| ("t/rt".into(), p.clone()))
        .collect();
    ensure!(
        got == want,
        "subscriber got {got:?}, want {want:?}\nstdout:\n{out}stderr:\n{err}"
    );
    ensure!(st.success(), "subscriber exited {st}: {err}");
    // Both sessions went through splicer.
    let closed = splicer.wait_closed(2, STEP)?;
    ensure!(
        closed
            .iter()
            .all(|l| close_field(l, "client").is_some_and(|c| c.starts_with("127.0.0.2:"))),
        "close lines:\n{}",
        closed.join("\n")
    );
    Ok(())
}

/// Two MQTT.js clients through splicer (PROXY v2 to aedes): QoS 1 messages
/// published by one reach the other, in order; through a plain TCP
/// listener and through `protocol = "mqtt"`.
#[test]
fn mqtt_client_roundtrip_qos1_through_splicer() -> Result<()> {
    for mode in MODES {
        for protocol in ["tcp", "mqtt"] {
            roundtrip(mode, protocol).with_context(|| format!("offload {mode}, protocol {protocol}"))?;
        }
    }
    Ok(())
}
