//! `splicer convert-nginx` on every nginx config of the EMQX guide
//! (tests/nginx-guide, copied block for block from the guide): each one
//! converts with nothing left untranslated, to exactly the keys below, and
//! the result passes `splicer --check`. For the single-tier TCP and
//! WebSocket set-ups, a real nginx running the guide's config and splicer
//! running its conversion both give aedes the same client address: the
//! MQTT.js client's own.
use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{ensure, Context as _, Result};
use splicer_tests::*;

fn guide_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("nginx-guide")
}

/// The guide's configs, in the guide's order.
fn guide_configs() -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(guide_dir())?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "conf"));
    files.sort();
    Ok(files)
}

/// `splicer convert-nginx FILE`: (exit status, stdout, stderr).
fn convert(file: &Path) -> Result<(std::process::ExitStatus, String, String)> {
    run_with_timeout(
        Command::new(splicer_bin()).arg("convert-nginx").arg(file),
        STEP,
    )
}

/// The TOML's settings: its lines without comments and blank lines.
fn settings(toml: &str) -> Vec<&str> {
    toml.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect()
}

/// What each of the guide's configs must turn into, key for key, after
/// `name`, `listen` and `protocol` (which follow from the file name: tcp
/// ones are stream servers on 1883, ws ones http servers on 8083).
const EXPECTED: [(&str, &[&str]); 13] = [
    ("01-tcp-single-tier.conf", &[
        r#"upstream = ["172.16.0.71:1883"]"#, r#"send-proxy = "v1""#,
    ]),
    ("02-tcp-passthrough-lb1.conf", &[
        r#"upstream = ["172.16.0.200:1883"]"#, r#"send-proxy = "v1""#,
    ]),
    ("03-tcp-passthrough-lb2.conf", &[
        r#"upstream = ["172.16.0.71:1883"]"#,
    ]),
    ("04-tcp-reemit-lb1.conf", &[
        r#"upstream = ["172.16.0.200:1883"]"#, r#"send-proxy = "v1""#,
    ]),
    ("05-tcp-reemit-lb2.conf", &[
        r#"upstream = ["172.16.0.71:1883"]"#, r#"send-proxy = "v1""#, r#"accept-proxy = "auto""#,
        r#"trusted-proxy = ["172.16.0.0/24"]"#,
    ]),
    ("06-ws-single-tier.conf", &[
        r#"upstream = ["172.16.0.71:8083"]"#, r#"ws-path = "/mqtt""#, r#"forwarded-for = "override""#,
        r#"forwarded-port = "override""#,
    ]),
    ("07-ws-method1-lb1.conf", &[
        r#"upstream = ["172.16.0.200:8083"]"#, r#"ws-path = "/mqtt""#, r#"forwarded-for = "override""#,
        r#"forwarded-port = "override""#,
    ]),
    ("08-ws-method1-lb2.conf", &[
        r#"upstream = ["172.16.0.71:8083"]"#, r#"ws-path = "/mqtt""#, r#"forwarded-for = "append""#,
        r#"forwarded-port = "append""#,
    ]),
    ("09-ws-method1-client-proxy.conf", &[
        r#"upstream = ["121.36.192.227:8083"]"#, r#"ws-path = "/mqtt""#, r#"forwarded-for = "override""#,
        r#"forwarded-port = "override""#,
    ]),
    ("10-ws-method2-lb1.conf", &[
        r#"upstream = ["172.16.0.200:8083"]"#, r#"ws-path = "/mqtt""#, r#"forwarded-for = "append""#,
        r#"forwarded-port = "append""#,
    ]),
    ("11-ws-method2-lb2.conf", &[
        r#"upstream = ["172.16.0.225:8083"]"#, r#"ws-path = "/mqtt""#, r#"forwarded-for = "append""#,
        r#"forwarded-port = "append""#,
    ]),
    ("12-ws-method2-lb3.conf", &[
        r#"upstream = ["172.16.0.71:8083"]"#, r#"trusted-proxy = ["172.16.0.0/24"]"#, r#"ws-path = "/mqtt""#,
        r#"forwarded-for = "append""#, r#"forwarded-port = "append""#,
        r#"real-ip-header = "X-Forwarded-For""#, r#"real-ip-recursive = true"#,
        r#"set-real-ip-header = "X-Real-IP""#,
    ]),
    ("13-ws-method2-client-proxy.conf", &[
        r#"upstream = ["121.36.192.227:8083"]"#, r#"ws-path = "/mqtt""#, r#"forwarded-for = "override""#,
        r#"forwarded-port = "override""#,
    ]),
];

/// Every config in the guide converts with nothing left over, to the keys
/// above, and splicer accepts the result.
#[test]
fn every_guide_config_converts_and_checks() -> Result<()> {
    let dir = scratch("convert-guide");
    let files = guide_configs()?;
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    ensure!(
        names == EXPECTED.map(|(n, _)| n.to_string()),
        "tests/nginx-guide holds {names:?}"
    );
    for (file, (name, keys)) in files.iter().zip(EXPECTED) {
        let (st, out, err) = convert(file)?;
        ensure!(st.success(), "{name}: convert-nginx exited {st}:\n{err}");
        ensure!(
            err.is_empty() && !out.contains("Not translated"),
            "{name}: the guide's configs translate fully, but:\n{err}{out}"
        );
        let (module, port, protocol) = match name.contains("tcp") {
            true => ("stream", 1883, "tcp"),
            false => ("http", 8083, "ws"),
        };
        let mut want = vec![
            "[[listener]]".to_string(),
            format!(r#"name = "{module}-{port}""#),
            format!(r#"listen = "0.0.0.0:{port}""#),
            format!(r#"protocol = "{protocol}""#),
        ];
        want.extend(keys.iter().map(|k| k.to_string()));
        ensure!(
            settings(&out) == want,
            "{name}: converted to\n{out}\nwant the settings\n{}",
            want.join("\n")
        );
        let toml = dir.join(name.replace(".conf", ".toml"));
        fs::write(&toml, &out)?;
        check_config(&splicer_bin(), &toml).with_context(|| format!("{name}, converted to\n{out}"))?;
    }
    Ok(())
}

/// tests/nginx-guide is the guide's own text, block for block, when the
/// guide is at hand (../shared/reference, or SPLICER_GUIDE).
#[test]
fn fixtures_are_the_guides_blocks() -> Result<()> {
    let guide = std::env::var_os("SPLICER_GUIDE").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference/emqx-nginx-real-ip-guide.txt")
    });
    let Ok(text) = fs::read_to_string(&guide) else {
        eprintln!("skipped: the guide is not at {}", guide.display());
        return Ok(());
    };
    // Each `stream {` or `http {` at the start of a line, to the `}` that
    // closes it at the start of a line.
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let opens = ["stream {", "http {"].iter().any(|o| lines[i].trim_end() == *o);
        if opens {
            let end = (i..lines.len())
                .find(|&j| lines[j].trim_end() == "}")
                .context("unclosed block in the guide")?;
            blocks.push(lines[i..=end].join("\n") + "\n");
            i = end;
        }
        i += 1;
    }
    let files = guide_configs()?;
    ensure!(blocks.len() == files.len(), "the guide has {} blocks, tests/nginx-guide {}", blocks.len(), files.len());
    for (block, file) in blocks.iter().zip(&files) {
        let ours = fs::read_to_string(file)?;
        ensure!(&ours == block, "{} differs from the guide's block:\n{block}", file.display());
    }
    Ok(())
}

/// The guide's config with the example addresses replaced by live ones.
fn live(file: &str, guide_upstream: &str, upstream: SocketAddr, guide_listen: &str, listen: SocketAddr) -> Result<String> {
    let text = fs::read_to_string(guide_dir().join(file))?;
    ensure!(text.contains(guide_upstream) && text.contains(guide_listen), "{file} changed");
    Ok(text
        .replace(guide_upstream, &upstream.to_string())
        .replace(guide_listen, &format!("listen {listen};")))
}

/// Converts `nginx_conf` and runs splicer on the result; the converted
/// config must listen on `listen`.
fn run_converted(dir: &Path, nginx_conf: &str, listen: SocketAddr) -> Result<Splicer> {
    let conf = dir.join("for-splicer.conf");
    fs::write(&conf, nginx_conf)?;
    let (st, toml, err) = convert(&conf)?;
    ensure!(st.success(), "convert-nginx exited {st}:\n{err}");
    ensure!(toml.contains(&format!("listen = \"{listen}\"")), "{toml}");
    let path = dir.join("splicer.toml");
    fs::write(&path, toml)?;
    let mut cmd = Command::new(splicer_bin());
    cmd.arg("--config").arg(&path);
    Splicer::start_cmd(dir, cmd, listen)
}

/// What aedes made of a client, beside the client's own port.
struct Seen {
    local_port: String,
    ip: String,
    port: String,
    is_proxy: String,
    /// WebSocket: the X-Forwarded-Port the broker got.
    forwarded_port: Option<String>,
}

/// MQTT.js connects through `url` as client `id` from CLIENT_IP, with
/// `extra` arguments, and publishes once.
fn seen_by_broker(broker: &mut Proc, url: &str, id: &str, extra: &[&str]) -> Result<Seen> {
    let args = [&["--publish", "t/convert", "x"][..], extra].concat();
    let out = run_mqtt_client(url, id, &args, STEP)?;
    let local_port = json_field(client_connected(&out, id)?, "localPort").context("no localPort")?;
    let seen = aedes_client(broker, id)?;
    eprintln!("{id}: client port {local_port}, aedes saw {seen}");
    let field = |f: &str| json_field(&seen, f).unwrap_or_default();
    Ok(Seen {
        local_port,
        ip: field("ip"),
        port: field("port"),
        is_proxy: field("isProxy"),
        forwarded_port: serde_json::from_str::<serde_json::Value>(&seen)?["headers"]["x-forwarded-port"]
            .as_str()
            .map(str::to_string),
    })
}

/// The guide's single-tier TCP set-up: nginx with `proxy_protocol on` and
/// splicer with its conversion tell aedes the same client, the MQTT.js
/// client itself, in a PROXY v1 header.
#[test]
fn tcp_single_tier_broker_sees_what_nginx_shows_it() -> Result<()> {
    let dir = scratch("convert-tcp");
    let (mut broker, broker_addr) = start_aedes(&dir)?;
    let file = "01-tcp-single-tier.conf";
    let nginx_listen = v4(NGINX_IP, free_port(NGINX_IP));
    let ndir = dir.join("nginx");
    fs::create_dir_all(&ndir)?;
    let nginx_conf = live(file, "172.16.0.71:1883", broker_addr, "listen 1883;", nginx_listen)?;
    let _nginx = start_nginx(
        &ndir,
        nginx_listen,
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n",
        &nginx_conf,
    )?;
    let splicer_listen = v4(SPLICER_IP, free_port(SPLICER_IP));
    let splicer_conf = live(file, "172.16.0.71:1883", broker_addr, "listen 1883;", splicer_listen)?;
    let splicer = run_converted(&dir, &splicer_conf, splicer_listen)?;

    for (who, listen) in [("nginx", nginx_listen), ("splicer", splicer.listen)] {
        let s = seen_by_broker(&mut broker, &format!("mqtt://{listen}"), &format!("tcp-via-{who}"), &[])?;
        ensure!(
            s.ip == CLIENT_IP.to_string() && s.port == s.local_port && s.is_proxy == "1",
            "through {who}, aedes saw {}:{} (isProxy {}); the client is {CLIENT_IP}:{}, in a v1 header",
            s.ip,
            s.port,
            s.is_proxy,
            s.local_port
        );
    }
    Ok(())
}

/// The guide's single-tier WebSocket set-up: nginx overriding
/// X-Forwarded-For/-Port and splicer with its conversion tell aedes the same
/// client, the MQTT.js client itself, even when the client sends its own
/// X-Forwarded-For.
#[test]
fn ws_single_tier_broker_sees_what_nginx_shows_it() -> Result<()> {
    let dir = scratch("convert-ws");
    let (mut broker, broker_ws) = start_aedes_ws(&dir)?;
    let file = "06-ws-single-tier.conf";
    let nginx_listen = v4(NGINX_IP, free_port(NGINX_IP));
    let ndir = dir.join("nginx");
    fs::create_dir_all(ndir.join("logs"))?;
    let nginx_conf = live(file, "172.16.0.71:8083", broker_ws, "listen 8083;", nginx_listen)?;
    let _nginx = start_nginx(&ndir, nginx_listen, "", &nginx_conf)?;
    let splicer_listen = v4(SPLICER_IP, free_port(SPLICER_IP));
    let splicer_conf = live(file, "172.16.0.71:8083", broker_ws, "listen 8083;", splicer_listen)?;
    let splicer = run_converted(&dir, &splicer_conf, splicer_listen)?;

    for (who, listen) in [("nginx", nginx_listen), ("splicer", splicer.listen)] {
        let url = format!("ws://{listen}/mqtt");
        let spoof = ["--ws-header", "X-Forwarded-For: 6.6.6.6"];
        let s = seen_by_broker(&mut broker, &url, &format!("ws-via-{who}"), &spoof)?;
        // aedes takes the address from X-Forwarded-For but not the port
        // (its `port` is the TCP peer's): the header the broker got is
        // checked instead, as EMQX's proxy_port_header would read it.
        ensure!(
            s.ip == CLIENT_IP.to_string() && s.forwarded_port.as_ref() == Some(&s.local_port),
            "through {who}, aedes saw {} with X-Forwarded-Port {:?}; the client is {CLIENT_IP}:{}",
            s.ip,
            s.forwarded_port,
            s.local_port
        );
    }
    Ok(())
}
