//! Harness for splicer's end-to-end tests: starts splicer and real peers as
//! child processes on loopback addresses, and stops them by PID. The
//! process, port and listener helpers it shares with `cargo xtask bench`
//! come from splicer-testkit and are re-exported here.
//!
//! Addresses: clients bind 127.0.0.2, splicer listens on 127.0.0.3 and
//! brokers on 127.0.0.4, so that "who connected" is never ambiguous.
//! (splicer's own upstream connections come from 127.0.0.1.)
use std::{
    fs,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};

pub mod http;
pub mod net;
pub mod observe;
pub mod peers;
pub mod rawtcp;
pub mod tls;
pub use http::*;
pub use net::*;
pub use observe::*;
pub use peers::*;
pub use tls::*;
pub use splicer_testkit::{free_port, is_listening, mqtt, run_with_timeout, Proc};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
pub const SPLICER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
pub const BROKER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);

/// How long one step of a test (a peer starting, a line or a connection
/// arriving) may take.
pub const STEP: Duration = Duration::from_secs(10);

/// Both offload modes; most tests run once in each.
pub const MODES: [&str; 2] = ["sockmap", "userspace"];

pub fn splicer_bin() -> PathBuf {
    std::env::var_os("SPLICER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/release/splicer"))
}

pub fn peers_dir() -> PathBuf {
    std::env::var_os("SPLICER_PEERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("tests/peers"))
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A scratch directory for one test's logs and configs.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("splicer-e2e-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// The flag that has the kernel take each connection at once, for tests
/// that check the kernel path carried it (the default, `--handoff auto`,
/// first relays in userspace).
pub const HANDOFF_NOW: [&str; 2] = ["--handoff", "now"];

/// A running splicer.
pub struct Splicer {
    pub proc: Proc,
    pub listen: SocketAddr,
}

impl Splicer {
    /// Starts splicer listening on SPLICER_IP:<free port> with extra args,
    /// and waits until it listens.
    pub fn start(dir: &Path, args: &[&str]) -> Result<Splicer> {
        let listen = SocketAddr::new(IpAddr::V4(SPLICER_IP), free_port(SPLICER_IP));
        let mut cmd = Command::new(splicer_bin());
        cmd.arg("--listen").arg(listen.to_string()).args(args);
        Self::start_cmd(dir, cmd, listen)
    }

    pub fn start_cmd(dir: &Path, mut cmd: Command, listen: SocketAddr) -> Result<Splicer> {
        let mut proc = Proc::spawn("splicer", dir, &mut cmd)?;
        proc.wait_line("listening on", Duration::from_secs(10))?;
        Ok(Splicer { proc, listen })
    }

    /// The offload in effect, from the start-up line ("sockmap"/"userspace").
    pub fn offload(&self) -> String {
        let line = self
            .proc
            .lines_with("offload: ")
            .into_iter()
            .next()
            .unwrap_or_default();
        let mode = line.split("offload: ").nth(1).unwrap_or("");
        mode.split([' ', ',']).next().unwrap_or("").to_string()
    }

    /// Close log lines so far.
    pub fn closed_lines(&self) -> Vec<String> {
        self.proc.lines_with("] closed client=")
    }

    /// Waits until `n` connections have logged their close line.
    pub fn wait_closed(&self, n: usize, timeout: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.closed_lines();
            if lines.len() >= n {
                return Ok(lines);
            }
            if Instant::now() > deadline {
                bail!(
                    "only {} of {n} close lines after {timeout:?}:\n{}",
                    lines.len(),
                    self.proc.output()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the close line whose client= is `client`, for tests that
    /// run several connections and check one of them.
    pub fn close_line_for(&self, client: SocketAddr, timeout: Duration) -> Result<String> {
        let want = client.to_string();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .closed_lines()
                .into_iter()
                .find(|l| close_field(l, "client") == Some(want.as_str()))
            {
                return Ok(l);
            }
            ensure!(
                Instant::now() < deadline,
                "no close line for client={want}:\n{}",
                self.proc.output()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `splicer --check --config FILE`: what it printed, or Err with why it
/// refused the file.
pub fn check_config(bin: &Path, config: &Path) -> Result<String> {
    let (st, out, err) = run_with_timeout(
        Command::new(bin).arg("--check").arg("--config").arg(config),
        STEP,
    )?;
    ensure!(
        st.success() && out.starts_with("configuration ok"),
        "splicer --check refused {} ({st}):\n{err}{out}",
        config.display()
    );
    Ok(out)
}

/// A `key=value` word of a splicer close line (which is not JSON, so
/// json_field does not apply).
pub fn close_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(pat.as_str()))
}

/// A numeric `key=` of a close line; an error if it is missing.
pub fn close_num(line: &str, key: &str) -> Result<u64> {
    close_field(line, key)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no numeric {key}= in close line: {line}"))
}

/// Starts splicer in `mode` forwarding to `upstream` and checks that the
/// mode asked for is the mode in effect. In sockmap mode the kernel takes
/// each connection at once (`--handoff now`) unless `extra` says otherwise:
/// these tests check what the kernel path carries, and under the default
/// `--handoff auto` a short test connection would never reach it
/// (handoff.rs tests the default).
pub fn splicer_in_mode(
    dir: &Path,
    mode: &str,
    upstream: SocketAddr,
    extra: &[&str],
) -> Result<Splicer> {
    let up = upstream.to_string();
    let mut args = vec!["--upstream", up.as_str(), "--offload", mode];
    if mode == "sockmap" && !extra.contains(&"--handoff") {
        args.extend(HANDOFF_NOW);
    }
    args.extend_from_slice(extra);
    let s = Splicer::start(dir, &args)?;
    if s.offload() != mode {
        bail!(
            "asked for --offload {mode}, got {:?}:\n{}",
            s.offload(),
            s.proc.output()
        );
    }
    Ok(s)
}

/// Connects to `to` from CLIENT_IP.
pub fn connect_from_client(to: SocketAddr) -> Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::new(IpAddr::V4(CLIENT_IP), 0).into())?;
    sock.connect_timeout(&to.into(), Duration::from_secs(5))?;
    Ok(sock.into())
}

/// Reads until EOF with a deadline.
pub fn read_to_end_timeout(s: &mut TcpStream, timeout: Duration) -> Result<Vec<u8>> {
    s.set_read_timeout(Some(timeout))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .map_err(|e| anyhow!("read: {e} after {} bytes", out.len()))?;
    Ok(out)
}

/// Deterministic test data: a xorshift64* stream keyed by `seed`. Both
/// ends regenerate it, so every byte can be checked in place.
pub struct Pattern {
    state: u64,
    buf: [u8; 8],
    pos: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Pattern {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            buf: [0; 8],
            pos: 8,
        }
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            if self.pos == 8 {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.buf = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
                self.pos = 0;
            }
            *b = self.buf[self.pos];
            self.pos += 1;
        }
    }
}

/// Writes `len` pattern bytes to `w` in chunks.
pub fn send_pattern(w: &mut impl Write, seed: u64, len: u64) -> std::io::Result<()> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Reads from `r` until EOF and checks it is exactly `len` pattern bytes.
pub fn expect_pattern(r: &mut impl Read, seed: u64, len: u64) -> Result<()> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    loop {
        let n = r
            .read(&mut buf)
            .map_err(|e| anyhow!("read failed after {got} of {len} bytes: {e}"))?;
        if n == 0 {
            break;
        }
        if got + n as u64 > len {
            bail!(
                "received more than the {len} bytes sent ({} so far)",
                got + n as u64
            );
        }
        p.fill(&mut want[..n]);
        if buf[..n] != want[..n] {
            let i = (0..n).find(|&i| buf[i] != want[i]).unwrap();
            bail!(
                "byte {} differs (stream of {len} bytes, seed {seed})",
                got + i as u64
            );
        }
        got += n as u64;
    }
    if got != len {
        bail!("EOF after {got} of {len} bytes");
    }
    Ok(())
}

/// Reads a PROXY header (v1 line or v2 binary) off the front of a stream
/// without reading past it; returns its bytes.
pub fn read_proxy_header(s: &mut TcpStream) -> Result<Vec<u8>> {
    let mut first = [0u8; 16];
    s.read_exact(&mut first[..1])?;
    if first[0] == b'P' {
        let mut line = vec![b'P'];
        let mut b = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            s.read_exact(&mut b)?;
            line.push(b[0]);
            if line.len() > 107 {
                bail!("v1 header longer than 107 bytes");
            }
        }
        return Ok(line);
    }
    s.read_exact(&mut first[1..])?;
    let len = u16::from_be_bytes([first[14], first[15]]) as usize;
    let mut rest = vec![0u8; len];
    s.read_exact(&mut rest)?;
    let mut all = first.to_vec();
    all.extend(rest);
    Ok(all)
}

/// Hand-built expected PROXY headers (independent of splicer's builder).
pub fn expected_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

pub fn expected_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    v2_header(src, dst, &[])
}

/// A PROXY v2 PROXY/TCP4 header with `tlvs` (already encoded) after the
/// addresses.
pub fn v2_header(src: SocketAddr, dst: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        panic!("IPv4 only")
    };
    let mut v = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v.extend([0x21, 0x11]);
    v.extend(u16::try_from(12 + tlvs.len()).expect("TLVs under 64 KiB").to_be_bytes());
    v.extend(s.octets());
    v.extend(d.octets());
    v.extend(src.port().to_be_bytes());
    v.extend(dst.port().to_be_bytes());
    v.extend(tlvs);
    v
}

/// Entries in one of a process's eBPF maps, found by name among the map
/// fds it holds (/proc/PID/fdinfo has each map's id).
pub fn bpf_map_entries(pid: u32, map_name: &str) -> Result<usize> {
    let bpftool = |args: &[&str]| -> Result<String> {
        let (st, out, err) = run_with_timeout(
            Command::new("bpftool").arg("-j").args(args),
            Duration::from_secs(10),
        )?;
        ensure!(st.success(), "bpftool {args:?} failed: {err}");
        Ok(out)
    };
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let info = fs::read_to_string(entry?.path()).unwrap_or_default();
        let Some(id) = info.lines().find_map(|l| l.strip_prefix("map_id:")) else {
            continue;
        };
        let id = id.trim();
        if bpftool(&["map", "show", "id", id])?.contains(&format!("\"name\":\"{map_name}\"")) {
            // One JSON object per entry, each with a "key".
            return Ok(bpftool(&["map", "dump", "id", id])?
                .matches("\"key\"")
                .count());
        }
    }
    bail!("process {pid} holds no eBPF map named {map_name}")
}

/// Binds `ip:0`-style listeners for upstream test servers.
pub fn listen_on(ip: Ipv4Addr) -> Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind((ip, free_port(ip)))?;
    let a = l.local_addr()?;
    Ok((l, a))
}

/// Waits for a line of the child's log that satisfies `pred`.
pub fn wait_json_line(
    proc: &mut Proc,
    pred: impl Fn(&str) -> bool,
    timeout: Duration,
) -> Result<String> {
    proc.wait_for("matching line", timeout, |p| {
        Ok(p.output().lines().find(|l| pred(l)).map(String::from))
    })
}

/// Extracts a JSON string or number field's raw text from a flat JSON line.
pub fn json_field(line: &str, field: &str) -> Option<String> {
    let pat = format!("\"{field}\":");
    let rest = &line[line.find(&pat)? + pat.len()..];
    if let Some(s) = rest.strip_prefix('"') {
        return Some(s[..s.find('"')?].to_string());
    }
    Some(
        rest.chars()
            .take_while(|c| !matches!(c, ',' | '}'))
            .collect::<String>()
            .trim()
            .to_string(),
    )
}

/// Whether a peer's JSON line is the `event` one (the Node peers tag every
/// line with "event").
pub fn is_event(line: &str, event: &str) -> bool {
    json_field(line, "event").as_deref() == Some(event)
}

/// Checks the close lines' `kernel_bytes=` against the offload mode: in
/// userspace mode every one is 0; in sockmap mode every one (`every`) or at
/// least one (short sessions may close before the handoff) is above 0.
pub fn check_kernel_bytes(closed: &[String], mode: &str, every: bool) -> Result<()> {
    let kernel: Vec<u64> = closed
        .iter()
        .map(|l| close_num(l, "kernel_bytes"))
        .collect::<Result<_>>()?;
    if mode == "sockmap" {
        let spliced = |k: &u64| *k > 0;
        let ok = if every {
            kernel.iter().all(spliced)
        } else {
            kernel.iter().any(spliced)
        };
        ensure!(
            ok,
            "sockmap: kernel_bytes not above 0 in {} close lines:\n{}",
            if every { "all" } else { "any" },
            closed.join("\n")
        );
    } else {
        ensure!(
            kernel.iter().all(|&k| k == 0),
            "userspace: kernel_bytes > 0:\n{}",
            closed.join("\n")
        );
    }
    Ok(())
}
