//! Real peers the tests run next to splicer: aedes and MQTT.js (Node, from
//! `peers_dir()`), mosquitto and nginx.
use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Command, ExitStatus},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::{
    close_num, free_port, is_event, json_field, peers_dir, run_with_timeout, v4, wait_json_line, Proc,
    Splicer, BROKER_IP, CLIENT_IP, STEP,
};

/// The aedes broker peer (with aedes-protocol-decoder) on BROKER_IP with a
/// port it picks itself; returns it and its MQTT address once its `ready`
/// line is out.
pub fn start_aedes(dir: &Path) -> Result<(Proc, SocketAddr)> {
    aedes(dir, false)
}

/// As start_aedes, with a WebSocket listener too; returns that listener's
/// address.
pub fn start_aedes_ws(dir: &Path) -> Result<(Proc, SocketAddr)> {
    aedes(dir, true)
}

fn aedes(dir: &Path, ws: bool) -> Result<(Proc, SocketAddr)> {
    let peers = peers_dir();
    ensure!(
        peers.join("node_modules").is_dir(),
        "{}/node_modules is missing: run `npm ci` there",
        peers.display()
    );
    let mut cmd = Command::new("node");
    cmd.arg(peers.join("aedes-broker.js"))
        .args(["--host", &BROKER_IP.to_string(), "--port", "0"]);
    if ws {
        cmd.args(["--ws-port", "0"]);
    }
    let mut broker = Proc::spawn("aedes", dir, &mut cmd)?;
    let ready = wait_json_line(
        &mut broker,
        |l| is_event(l, "ready"),
        Duration::from_secs(20),
    )?;
    let key = if ws { "wsPort" } else { "port" };
    let port: u16 = json_field(&ready, key)
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no {key} in {ready}"))?;
    Ok((broker, v4(BROKER_IP, port)))
}

/// Waits for aedes' `client` line for client `id`: what its protocol
/// decoder made of the connection (ip, port, isProxy, socketIp, ...).
pub fn aedes_client(broker: &mut Proc, id: &str) -> Result<String> {
    wait_json_line(
        broker,
        |l| is_event(l, "client") && json_field(l, "id").as_deref() == Some(id),
        STEP,
    )
}

/// The MQTT.js client peer (mqtt-client.js) for `url` (mqtt:// or ws://),
/// bound to CLIENT_IP; `args` say what it does.
pub fn mqtt_client_cmd(url: &str, id: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("node");
    cmd.arg(peers_dir().join("mqtt-client.js"))
        .args(["--url", url])
        .args(["--id", id, "--bind-host", &CLIENT_IP.to_string()])
        .args(args);
    cmd
}

/// Runs the MQTT.js client to completion; fails unless it exits 0 within
/// `timeout`. Returns its stdout (JSON lines).
pub fn run_mqtt_client(url: &str, id: &str, args: &[&str], timeout: Duration) -> Result<String> {
    let (st, out, err) = run_with_timeout(&mut mqtt_client_cmd(url, id, args), timeout)?;
    ensure!(
        st.success(),
        "mqtt-client {id} exited {st}\nstdout:\n{out}stderr:\n{err}"
    );
    Ok(out)
}

/// The MQTT.js client's `connected` line in `out`, checked to be bound to
/// 127.0.0.2 (so the address a broker reports can be told from splicer's).
pub fn client_connected<'a>(out: &'a str, id: &str) -> Result<&'a str> {
    let connected = out
        .lines()
        .find(|l| is_event(l, "connected"))
        .with_context(|| format!("{id}: no connected line:\n{out}"))?;
    ensure!(
        json_field(connected, "localAddress").as_deref() == Some("127.0.0.2"),
        "{id} not bound to 127.0.0.2: {connected}"
    );
    Ok(connected)
}

/// mosquitto_pub from CLIENT_IP through splicer as client `id`, at QoS 1
/// (so the broker's PUBACK must come back); returns the connection's close
/// line, checked to show MQTT flowing both ways.
pub fn mosquitto_publish(s: &Splicer, id: &str, topic: &str) -> Result<String> {
    let before = s.closed_lines().len();
    let (st, out, err) = run_with_timeout(
        Command::new("mosquitto_pub")
            .args(["-h", &s.listen.ip().to_string(), "-p", &s.listen.port().to_string()])
            .args(["-A", &CLIENT_IP.to_string(), "-i", id, "-q", "1"])
            .args(["-t", topic, "-m", id]),
        STEP,
    )?;
    ensure!(
        st.success(),
        "mosquitto_pub {id} through splicer: {st}\n{out}{err}\nsplicer:\n{}",
        s.proc.output()
    );
    let lines = s.wait_closed(before + 1, STEP)?;
    ensure!(
        lines.len() == before + 1,
        "one publish, {} new close lines:\n{}",
        lines.len() - before,
        lines.join("\n")
    );
    let line = lines[before].clone();
    // CONNECT + PUBLISH + DISCONNECT up, CONNACK + PUBACK down.
    ensure!(
        close_num(&line, "client_to_upstream")? > 0 && close_num(&line, "upstream_to_client")? >= 8,
        "MQTT did not flow both ways: {line}"
    );
    Ok(line)
}

/// mosquitto listening on `addr`, anonymous clients allowed, its files in
/// `dir`; fails if it exits instead.
pub fn start_mosquitto(dir: &Path, addr: SocketAddr) -> Result<Proc> {
    fs::create_dir_all(dir)?;
    let conf = format!("listener {} {}\nallow_anonymous true\n", addr.port(), addr.ip());
    match spawn_mosquitto(dir, &conf, addr)? {
        Ok(p) => Ok(p),
        Err((st, out)) => bail!("mosquitto on {addr} exited ({st}):\n{out}"),
    }
}

/// Runs mosquitto with the config text `conf` and waits until it accepts
/// TCP connections on `addr` (ready means accepting, not just started). If
/// it exits first, returns its status and output instead, so the caller
/// can tell a missing feature from a failure.
pub fn spawn_mosquitto(
    dir: &Path,
    conf: &str,
    addr: SocketAddr,
) -> Result<std::result::Result<Proc, (ExitStatus, String)>> {
    let path = dir.join("mosquitto.conf");
    fs::write(&path, conf)?;
    let mut broker = Proc::spawn(
        "mosquitto",
        dir,
        Command::new("mosquitto").arg("-c").arg(&path),
    )?;
    let deadline = Instant::now() + STEP;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Some(st) = broker.child.try_wait()? {
            return Ok(Err((st, broker.output())));
        }
        ensure!(
            Instant::now() < deadline,
            "mosquitto does not accept connections on {addr}:\n{}",
            broker.output()
        );
        thread::sleep(Duration::from_millis(20));
    }
    Ok(Ok(broker))
}

/// mosquitto with a `protocol websockets` listener on BROKER_IP, or Err
/// with the reason it cannot run (then the caller skips).
pub fn start_mosquitto_ws(dir: &Path) -> Result<std::result::Result<(Proc, SocketAddr), String>> {
    // mosquitto 2.0.11 (Debian 12) refuses to start with only a websockets
    // listener ("Unable to start any listening sockets"), so there is a TCP
    // one too; and libwebsockets binds the wildcard address whatever the
    // listener line says, so the port must be free on [::] as well.
    let tcp_port = free_port(BROKER_IP);
    let ws_port = loop {
        let p = free_port(BROKER_IP);
        if TcpListener::bind(("::", p)).is_ok() && TcpListener::bind(("0.0.0.0", p)).is_ok() {
            break p;
        }
    };
    let conf = format!(
        "listener {tcp_port} {BROKER_IP}\n\
         listener {ws_port} {BROKER_IP}\nprotocol websockets\n\
         allow_anonymous true\npersistence false\nlog_dest stderr\nlog_type all\n"
    );
    let addr = v4(BROKER_IP, ws_port);
    match spawn_mosquitto(dir, &conf, addr)? {
        Ok(broker) => Ok(Ok((broker, addr))),
        Err((st, out)) if out.to_ascii_lowercase().contains("websockets") => Ok(Err(format!(
            "mosquitto has no usable websockets ({st}):\n{out}"
        ))),
        Err((st, out)) => bail!("mosquitto exited ({st}):\n{out}"),
    }
}

/// nginx in the foreground, single process, everything inside `dir`, once
/// it listens on `listen`. The config is `top` (e.g. load_module, which
/// must come first), the pid/error_log/events lines every test needs, then
/// `blocks` (the stream or http block).
pub fn start_nginx(dir: &Path, listen: SocketAddr, top: &str, blocks: &str) -> Result<Proc> {
    let conf = dir.join("nginx.conf");
    fs::write(
        &conf,
        format!(
            "{top}pid {d}/nginx.pid;\n\
             error_log {d}/nginx-error.log info;\n\
             events {{ worker_connections 256; }}\n\
             {blocks}",
            d = dir.display()
        ),
    )?;
    let mut p = Proc::spawn(
        "nginx",
        dir,
        Command::new("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off; master_process off;"]),
    )?;
    p.wait_listening(listen, STEP)?;
    Ok(p)
}

/// nginx with the stream module; `stream_body` goes inside `stream { }`.
pub fn start_nginx_stream(dir: &Path, listen: SocketAddr, stream_body: &str) -> Result<Proc> {
    start_nginx(
        dir,
        listen,
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n",
        &format!("stream {{\n{stream_body}\n}}\n"),
    )
}

/// nginx's own address: it listens there and binds its upstream side
/// there too, so the next tier sees it as the peer.
pub const NGINX_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);

/// nginx (http module) in the foreground, single process, all inside `dir`,
/// as a method 2 middle tier: appends $proxy_add_x_forwarded_for and
/// connects upstream from 127.0.0.5.
pub fn start_nginx_ws(dir: &Path, upstream: SocketAddr) -> Result<(Proc, SocketAddr)> {
    let listen = v4(NGINX_IP, free_port(NGINX_IP));
    let d = dir.display();
    let p = start_nginx(
        dir,
        listen,
        "",
        &format!(
            "http {{\n\
             access_log {d}/nginx-access.log;\n\
             client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
             server {{\n\
               listen {listen};\n\
               location /mqtt {{\n\
                 proxy_pass http://{upstream};\n\
                 proxy_http_version 1.1;\n\
                 proxy_set_header Upgrade $http_upgrade;\n\
                 proxy_set_header Connection \"Upgrade\";\n\
                 proxy_set_header Host $host;\n\
                 proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
                 proxy_bind {NGINX_IP};\n\
               }}\n\
             }}\n\
             }}\n"
        ),
    )?;
    Ok((p, listen))
}
