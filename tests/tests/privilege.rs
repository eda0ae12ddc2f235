//! Least privilege: splicer run as a dedicated non-root user with exactly
//! the capabilities `dist/splicer.service` grants still loads the sockmap
//! offload and splices; without any one of them `--offload sockmap` is
//! refused, naming the missing capability, and `--offload auto` falls back.
//!
//! The capability list lives only in the unit file (`AmbientCapabilities=`);
//! these tests read it from there, so the unit and the tests cannot drift.
use std::{
    fs,
    net::{Shutdown, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use splicer_tests::*;

/// The account the tests run splicer as (the unit's is `splicer`).
const TEST_USER: &str = "splicer-test";

fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/splicer.service")
}

/// The capabilities a `Key=` of the unit's [Service] section grants, as
/// systemd reads it: assignments add up, an empty one resets the list.
fn unit_caps(key: &str) -> Result<Vec<String>> {
    let unit = fs::read_to_string(unit_path()).context("reading dist/splicer.service")?;
    let mut caps: Vec<String> = Vec::new();
    let mut seen = false;
    for line in unit.lines().map(str::trim) {
        let Some(value) = line.strip_prefix(key).and_then(|r| r.strip_prefix('=')) else {
            continue;
        };
        seen = true;
        let value = value.trim();
        if value.is_empty() {
            caps.clear();
            continue;
        }
        ensure!(
            !value.starts_with('~'),
            "{key}=~... (an inverted list) is not supported by this test: {line}"
        );
        for cap in value.split_whitespace() {
            ensure!(
                cap.starts_with("CAP_"),
                "{key}= lists {cap:?}, not a CAP_ name"
            );
            if !caps.iter().any(|c| c == cap) {
                caps.push(cap.to_string());
            }
        }
    }
    ensure!(seen, "dist/splicer.service has no {key}= line");
    Ok(caps)
}

/// The unit's capability set, checked to be the same in both lines.
fn documented_caps() -> Result<Vec<String>> {
    let ambient = unit_caps("AmbientCapabilities")?;
    let mut bounding = unit_caps("CapabilityBoundingSet")?;
    let mut sorted = ambient.clone();
    sorted.sort();
    bounding.sort();
    ensure!(
        sorted == bounding,
        "AmbientCapabilities={ambient:?} but CapabilityBoundingSet={bounding:?}"
    );
    ensure!(!ambient.is_empty(), "the unit grants no capabilities");
    Ok(ambient)
}

/// Capability bit numbers (linux/capability.h) for the names a unit may use.
fn cap_bit(cap: &str) -> Result<u32> {
    Ok(match cap {
        "CAP_NET_BIND_SERVICE" => 10,
        "CAP_NET_ADMIN" => 12,
        "CAP_NET_RAW" => 13,
        "CAP_SYS_ADMIN" => 21,
        "CAP_SYS_RESOURCE" => 24,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        _ => bail!("capability {cap} unknown to this test; add its bit number"),
    })
}

/// (uid, gid) of the dedicated test user, created (once) if missing, as
/// the unit's install steps create `splicer`. Falls back to nobody where
/// no user can be added.
fn test_user() -> Result<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, TEST_USER]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if id("-u").is_none() {
        // Exit status 9: someone else created it meanwhile; fine too.
        let st = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--user-group",
                TEST_USER,
            ])
            .status();
        if let Err(e) = &st {
            eprintln!("useradd: {e}");
        }
    }
    match (id("-u"), id("-g")) {
        (Some(uid), Some(gid)) => {
            ensure!(uid != 0, "{TEST_USER} has uid 0");
            Ok((uid, gid))
        }
        _ => {
            eprintln!("cannot create user {TEST_USER}; running splicer as nobody");
            Ok((65534, 65534))
        }
    }
}

/// A copy of the splicer binary the test user can surely execute (the
/// build tree may sit under a directory only root can enter).
fn binary_for_user(dir: &Path) -> Result<PathBuf> {
    let bin = dir.join("splicer");
    fs::copy(splicer_bin(), &bin)
        .with_context(|| format!("copying {}", splicer_bin().display()))?;
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    Ok(bin)
}

/// `setpriv` running `bin` as the test user with exactly `caps` (inheritable,
/// ambient and bounding, so that they survive the exec and nothing else can
/// be regained), with no_new_privs as NoNewPrivileges=true does, and with
/// RLIMIT_MEMLOCK at 0 to show that the unit needs no LimitMEMLOCK=.
fn as_user(user: (u32, u32), caps: &[String], bin: &Path, args: &[&str]) -> Command {
    let list: String = std::iter::once("-all".to_string())
        .chain(
            caps.iter()
                .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase())),
        )
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = Command::new("prlimit");
    cmd.args(["--memlock=0:0", "--", "setpriv"])
        .arg(format!("--reuid={}", user.0))
        .arg(format!("--regid={}", user.1))
        .arg("--clear-groups")
        .arg(format!("--inh-caps={list}"))
        .arg(format!("--ambient-caps={list}"))
        .arg(format!("--bounding-set={list}"))
        .arg("--no-new-privs")
        .arg("--")
        .arg(bin)
        .args(args);
    cmd
}

/// A field of /proc/PID/status, e.g. "Uid" or "CapEff".
fn proc_status(pid: u32, field: &str) -> Result<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

#[test]
fn unit_file_runs_as_a_dedicated_user_with_bounded_capabilities() -> Result<()> {
    let caps = documented_caps()?;
    for cap in &caps {
        cap_bit(cap)?;
    }
    let unit = fs::read_to_string(unit_path())?;
    for want in [
        "User=splicer",
        "ExecStart=/usr/local/bin/splicer --config /etc/splicer/splicer.toml",
        "NoNewPrivileges=true",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillSignal=SIGTERM",
        "LimitNOFILE=1048576",
        "Restart=on-failure",
    ] {
        ensure!(
            unit.lines().any(|l| l.trim() == want),
            "dist/splicer.service lacks {want:?}"
        );
    }
    // A system-call filter must leave bpf() in (@system-service lacks it).
    for l in unit
        .lines()
        .filter_map(|l| l.trim().strip_prefix("SystemCallFilter="))
    {
        let words: Vec<&str> = l.trim_start_matches('~').split_whitespace().collect();
        let names_bpf = words
            .iter()
            .any(|w| matches!(*w, "bpf" | "@privileged" | "@known"));
        ensure!(
            names_bpf != l.starts_with('~'),
            "SystemCallFilter={l} takes bpf() away from splicer"
        );
    }
    ensure!(
        !unit.lines().any(|l| l.trim() == "PrivateUsers=true"),
        "PrivateUsers=true makes the capabilities useless for bpf()"
    );
    Ok(())
}

/// With exactly the unit's capabilities, as a non-root user: sockmap loads,
/// the process holds nothing more, and a few MiB each way are spliced by
/// the kernel, byte for byte.
#[test]
fn documented_capabilities_are_enough_for_sockmap() -> Result<()> {
    const UP: u64 = 6 << 20; // client -> upstream
    const DOWN: u64 = 3 << 20; // upstream -> client
    let caps = documented_caps()?;
    let user = test_user()?;
    let dir = scratch("privilege-enough");
    let bin = binary_for_user(&dir)?;
    let (listener, upstream) = listen_on(BROKER_IP)?;
    let listen: SocketAddr = (SPLICER_IP, free_port(SPLICER_IP)).into();
    let (listen_s, up_s) = (listen.to_string(), upstream.to_string());
    let cmd = as_user(
        user,
        &caps,
        &bin,
        &[
            "--listen",
            &listen_s,
            "--upstream",
            &up_s,
            "--offload",
            "sockmap",
            // The kernel path from the first byte: what needs the
            // capabilities.
            "--handoff",
            "now",
            "--log-level",
            "debug",
        ],
    );
    let mut s = Splicer::start_cmd(&dir, cmd, listen)?;
    ensure!(
        s.offload() == "sockmap",
        "offload line: {:?}\n{}",
        s.proc.lines_with("offload: "),
        s.proc.output()
    );
    ensure!(
        s.proc
            .lines_with("eBPF log forwarding unavailable")
            .is_empty(),
        "{}",
        s.proc.output()
    );

    // setpriv exec'd splicer in place: check what the process really holds.
    let pid = s.proc.pid();
    let uids = proc_status(pid, "Uid")?;
    let want_uid = user.0.to_string();
    ensure!(
        uids.split_whitespace().all(|u| u == want_uid),
        "splicer runs with Uid {uids}, want {want_uid} throughout"
    );
    let mask = caps
        .iter()
        .try_fold(0u64, |m, c| Ok::<_, anyhow::Error>(m | 1 << cap_bit(c)?))?;
    for field in ["CapEff", "CapPrm", "CapBnd"] {
        let v = u64::from_str_radix(&proc_status(pid, field)?, 16)?;
        ensure!(
            v == mask,
            "{field} {v:#x}, want exactly {caps:?} = {mask:#x}"
        );
    }

    let server = thread::spawn(move || -> Result<()> {
        let (mut u, _) = listener.accept()?;
        expect_pattern(&mut u, 61, UP)?;
        send_pattern(&mut u, 62, DOWN)?;
        u.shutdown(Shutdown::Write)?;
        Ok(())
    });
    let mut c = connect_from_client(listen)?;
    // Let the handoff to the kernel finish before the bulk bytes.
    thread::sleep(Duration::from_millis(200));
    let mut w = c.try_clone()?;
    let sender = thread::spawn(move || -> Result<()> {
        send_pattern(&mut w, 61, UP)?;
        w.shutdown(Shutdown::Write)?;
        Ok(())
    });
    c.set_read_timeout(Some(Duration::from_secs(20)))?;
    expect_pattern(&mut c, 62, DOWN)?;
    sender.join().unwrap()?;
    server.join().unwrap()?;
    drop(c);

    let line = s.wait_closed(1, STEP)?.remove(0);
    ensure!(close_num(&line, "client_to_upstream")? == UP, "{line}");
    ensure!(close_num(&line, "upstream_to_client")? == DOWN, "{line}");
    let kernel = close_num(&line, "kernel_bytes")?;
    ensure!(kernel > 0, "nothing spliced by the kernel: {line}");
    ensure!(
        kernel == UP + DOWN,
        "kernel_bytes={kernel}, want all {} bytes: {line}",
        UP + DOWN
    );
    // The program's own aya-log records arrive without CAP_PERFMON.
    ensure!(
        s.proc
            .lines_with("proxy_ebpf")
            .iter()
            .any(|l| l.contains("splice: ")),
        "no kernel log lines at debug:\n{}",
        s.proc.output()
    );
    let st = s.proc.stop();
    ensure!(
        st.is_some_and(|st| st.success()),
        "splicer exited with {st:?}:\n{}",
        s.proc.output()
    );
    Ok(())
}

/// Each eBPF capability of the unit is needed: without it `--offload
/// sockmap` refuses to start and names it; `--offload auto` says why it
/// falls back to userspace, and still forwards.
#[test]
fn each_documented_capability_is_required() -> Result<()> {
    let caps = documented_caps()?;
    let user = test_user()?;
    let dir = scratch("privilege-missing");
    let bin = binary_for_user(&dir)?;
    // Only for ports below 1024; the tests listen above.
    let ebpf_caps: Vec<&String> = caps
        .iter()
        .filter(|c| *c != "CAP_NET_BIND_SERVICE")
        .collect();
    ensure!(!ebpf_caps.is_empty(), "the unit grants no eBPF capability");
    for missing in ebpf_caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let (listener, upstream) = listen_on(BROKER_IP)?;
        let up_s = upstream.to_string();

        let listen = format!("{SPLICER_IP}:{}", free_port(SPLICER_IP));
        // A splicer that keeps running was not refused: run_with_timeout
        // kills it and reports the timeout.
        let (st, _, err) = run_with_timeout(
            &mut as_user(
                user,
                &fewer,
                &bin,
                &[
                    "--listen",
                    &listen,
                    "--upstream",
                    &up_s,
                    "--offload",
                    "sockmap",
                ],
            ),
            STEP,
        )
        .with_context(|| {
            format!(
                "without {missing}, --offload sockmap did not exit: is {missing} needed at all?"
            )
        })?;
        ensure!(
            !st.success(),
            "without {missing}: --offload sockmap exited 0"
        );
        ensure!(
            err.contains("--offload sockmap")
                && err.contains("permission denied loading eBPF")
                && err.contains(&format!("missing {missing}")),
            "without {missing}: the error does not name it:\n{err}"
        );

        let sub = format!("privilege-auto-{}", missing.to_lowercase());
        let adir = dir.join(&sub);
        fs::create_dir_all(&adir)?;
        let listen: SocketAddr = (SPLICER_IP, free_port(SPLICER_IP)).into();
        let listen_s = listen.to_string();
        let cmd = as_user(
            user,
            &fewer,
            &bin,
            &[
                "--listen",
                &listen_s,
                "--upstream",
                &up_s,
                "--offload",
                "auto",
            ],
        );
        let s = Splicer::start_cmd(&adir, cmd, listen)?;
        let line = s.proc.lines_with("offload: ").join("\n");
        ensure!(
            s.offload() == "userspace",
            "without {missing}: offload line {line}"
        );
        ensure!(
            line.contains("offload: userspace, because")
                && line.contains(&format!("missing {missing}")),
            "without {missing}: the fallback does not say why: {line}"
        );
        let server = thread::spawn(move || -> Result<()> {
            let (mut u, _) = listener.accept()?;
            expect_pattern(&mut u, 63, 100_000)
        });
        let mut c = connect_from_client(listen)?;
        send_pattern(&mut c, 63, 100_000)?;
        c.shutdown(Shutdown::Write)?;
        server.join().unwrap()?;
        drop(c);
        let closed = s.wait_closed(1, STEP)?;
        check_kernel_bytes(&closed, "userspace", true)?;
    }
    Ok(())
}
