//! Start-up behaviour: which offload is in effect and why, kernel log lines
//! in splicer's log, refused configurations, IPv6, and upstream failover.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use splicer_tests::*;

/// Accepts one connection and echoes it until EOF.
fn echo_once(listener: TcpListener) -> thread::JoinHandle<Result<Vec<u8>>> {
    thread::spawn(move || {
        let (mut s, _) = listener.accept()?;
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            s.write_all(&buf[..n])?;
        }
        s.shutdown(Shutdown::Write)?;
        Ok(all)
    })
}

/// Sends `msg` through splicer and checks it comes back.
fn roundtrip(listen: SocketAddr, msg: &[u8]) -> Result<()> {
    let mut c = connect_from_client(listen)?;
    c.write_all(msg)?;
    c.shutdown(Shutdown::Write)?;
    let got = read_to_end_timeout(&mut c, Duration::from_secs(5))?;
    ensure!(got == msg, "echo through splicer returned {got:?}");
    Ok(())
}

/// Runs splicer as user nobody with no capabilities.
fn unprivileged(args: &[&str]) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
    ])
    .arg(splicer_bin())
    .args(args);
    cmd
}

#[test]
fn sockmap_without_privilege_is_a_startup_error() -> Result<()> {
    let (_l, up) = listen_on(BROKER_IP)?;
    let listen = format!("{SPLICER_IP}:{}", free_port(SPLICER_IP));
    let (st, _, err) = run_with_timeout(
        &mut unprivileged(&[
            "--listen",
            &listen,
            "--upstream",
            &up.to_string(),
            "--offload",
            "sockmap",
        ]),
        Duration::from_secs(10),
    )?;
    ensure!(
        !st.success(),
        "splicer started without privilege in sockmap mode"
    );
    ensure!(
        err.contains("--offload sockmap") && err.contains("permission"),
        "unclear error: {err}"
    );
    Ok(())
}

#[test]
fn auto_falls_back_to_userspace_and_says_why() -> Result<()> {
    let dir = scratch("fallback");
    let (listener, up) = listen_on(BROKER_IP)?;
    let port = free_port(SPLICER_IP);
    let listen: SocketAddr = (SPLICER_IP, port).into();
    let cmd = unprivileged(&[
        "--listen",
        &listen.to_string(),
        "--upstream",
        &up.to_string(),
        "--offload",
        "auto",
    ]);
    let s = Splicer::start_cmd(&dir, cmd, listen)?;
    let line = s.proc.lines_with("offload: ").join("\n");
    ensure!(s.offload() == "userspace", "offload line: {line}");
    ensure!(
        line.contains("because") && line.contains("permission"),
        "no reason given: {line}"
    );
    let echo = echo_once(listener);
    roundtrip(listen, b"still forwarding")?;
    ensure!(echo.join().unwrap()? == b"still forwarding");
    Ok(())
}

#[test]
fn kernel_log_lines_follow_the_log_level() -> Result<()> {
    for (level, expect) in [("debug", true), ("info", false)] {
        let dir = scratch(&format!("ebpf-log-{level}"));
        let (listener, up) = listen_on(BROKER_IP)?;
        let s = splicer_in_mode(&dir, "sockmap", up, &["--log-level", level])?;
        let echo = echo_once(listener);
        let mut c = connect_from_client(s.listen)?;
        // Let the handoff finish so the bytes go through the verdict program.
        thread::sleep(Duration::from_millis(200));
        c.write_all(&[7u8; 100_000])?;
        c.shutdown(Shutdown::Write)?;
        ensure!(read_to_end_timeout(&mut c, Duration::from_secs(5))?.len() == 100_000);
        echo.join().unwrap()?;
        s.wait_closed(1, Duration::from_secs(5))?;
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut lines = Vec::new();
        while Instant::now() < deadline {
            lines = s.proc.lines_with("proxy_ebpf");
            if !lines.is_empty() || !expect {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        if expect {
            ensure!(
                lines
                    .iter()
                    .any(|l| l.contains("splice: ") && l.contains("bytes")),
                "no kernel log lines at debug:\n{}",
                s.proc.output()
            );
        } else {
            ensure!(
                lines.is_empty(),
                "per-packet kernel lines at info: {lines:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn bad_flags_and_config_are_refused_by_name() -> Result<()> {
    let bin = splicer_bin();
    let (st, _, err) = run_with_timeout(
        Command::new(&bin).args(["--listen", "127.0.0.1:1", "--upstream", "nowhere"]),
        Duration::from_secs(5),
    )?;
    ensure!(
        st.code() == Some(2) && err.contains("--upstream"),
        "{st} {err}"
    );
    let dir = scratch("badconfig");
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "[[listener]]\nlisten = \"127.0.0.1:1\"\nupstream = [\"127.0.0.1:2\"]\nsend-proxy = \"v7\"\n")?;
    let (st, _, err) = run_with_timeout(
        Command::new(&bin).arg("--config").arg(&cfg),
        Duration::from_secs(5),
    )?;
    ensure!(
        st.code() == Some(2) && err.contains("send-proxy") && err.contains("v7"),
        "{st} {err}"
    );
    // The bundled config passes --check.
    let bundled = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../splicer.toml");
    check_config(&bin, &bundled)?;
    Ok(())
}

#[test]
fn ipv6_listener_upstream_and_proxy_header() -> Result<()> {
    for mode in MODES {
        let dir = scratch(&format!("ipv6-{mode}"));
        let upstream = TcpListener::bind("[::1]:0")?;
        let up = upstream.local_addr()?;
        let listen: SocketAddr = format!("[::1]:{}", free_port(Ipv4Addr::LOCALHOST)).parse()?;
        let mut cmd = Command::new(splicer_bin());
        cmd.args([
            "--listen",
            &listen.to_string(),
            "--upstream",
            &up.to_string(),
            "--offload",
            mode,
            "--send-proxy",
            "v1",
        ]);
        let _s = Splicer::start_cmd(&dir, cmd, listen)?;
        let server = thread::spawn(move || -> Result<(Vec<u8>, Vec<u8>)> {
            let (mut s, _) = upstream.accept()?;
            let header = read_proxy_header(&mut s)?;
            let mut body = Vec::new();
            s.read_to_end(&mut body)?;
            Ok((header, body))
        });
        let mut c = std::net::TcpStream::connect(listen)?;
        let local = c.local_addr()?;
        c.write_all(b"over ipv6")?;
        c.shutdown(Shutdown::Write)?;
        let (header, body) = server.join().unwrap()?;
        let want = format!("PROXY TCP6 ::1 ::1 {} {}\r\n", local.port(), listen.port());
        ensure!(
            header == want.as_bytes(),
            "{mode}: header {:?}, want {want:?}",
            String::from_utf8_lossy(&header)
        );
        ensure!(body == b"over ipv6", "{mode}: body {body:?}");
    }
    Ok(())
}

#[test]
fn dead_upstreams_are_skipped_and_all_down_is_counted() -> Result<()> {
    let dir = scratch("failover");
    // A port with nothing listening: connect is refused at once.
    let dead: SocketAddr = (BROKER_IP, free_port(BROKER_IP)).into();
    let (listener, live) = listen_on(BROKER_IP)?;
    let s = Splicer::start(
        &dir,
        &[
            "--upstream",
            &dead.to_string(),
            "--upstream",
            &live.to_string(),
        ],
    )?;
    // Round-robin starts at each upstream in turn; both connections must
    // end up at the live one.
    for i in 0..2 {
        let echo = echo_once(listener.try_clone()?);
        roundtrip(s.listen, format!("try {i}").as_bytes())?;
        echo.join().unwrap()?;
    }
    drop(listener);
    let mut c = connect_from_client(s.listen)?;
    let got = read_to_end_timeout(&mut c, Duration::from_secs(10))?;
    ensure!(got.is_empty(), "all-down client got bytes");
    let warned = s.proc.lines_with("every upstream is down");
    ensure!(
        warned.len() == 1,
        "expected one all-down warning: {warned:?}"
    );
    ensure!(
        s.proc.lines_with("connect failed").len() >= 3,
        "{}",
        s.proc.output()
    );
    Ok(())
}

#[test]
fn connect_timeout_moves_on_to_the_next_upstream() -> Result<()> {
    let dir = scratch("connect-timeout");
    // A listener that never accepts, with its backlog filled: further SYNs
    // are dropped, so a connect to it hangs until our timeout.
    let stuck = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let stuck_addr: SocketAddr = (BROKER_IP, free_port(BROKER_IP)).into();
    stuck.bind(&stuck_addr.into())?;
    stuck.listen(0)?;
    let _fillers: Vec<_> = (0..4)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&stuck_addr, Duration::from_millis(200)).ok()
        })
        .collect();
    let (listener, live) = listen_on(BROKER_IP)?;
    let s = Splicer::start(
        &dir,
        &[
            "--upstream",
            &stuck_addr.to_string(),
            "--upstream",
            &live.to_string(),
            "--connect-timeout",
            "300ms",
        ],
    )?;
    let echo = echo_once(listener);
    let t = Instant::now();
    roundtrip(s.listen, b"after a timeout")?;
    echo.join().unwrap()?;
    ensure!(
        s.proc.lines_with("timed out after 300ms").len() == 1,
        "{}",
        s.proc.output()
    );
    eprintln!("connect with one stuck upstream took {:?}", t.elapsed());
    Ok(())
}
