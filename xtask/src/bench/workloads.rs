//! One measurement of one workload through one forwarder: wait for quiet,
//! read the forwarder's CPU (and memory) and the machine's, run the load
//! generator's client, read them again, and derive the figures.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use serde_json::Value;
use splicer_testkit::proc::{read_in_background, run_with_timeout};

use super::{
    forwarders::{Forwarder, Kind, Setup},
    procs::{tree_cpu_s, tree_rss_bytes},
    system::{busy_cpu_s, kernel_mem_bytes, kernel_work_s, wait_quiet, Quiet},
    tls::{SERVER_NAME, SUITE},
    Plan,
};

/// How long the idle step waits before each memory reading (see `idle`).
const SETTLE: Duration = Duration::from_secs(11);

/// Everything one measurement produced; the JSON output is a list of these.
#[derive(Serialize, Clone)]
pub struct Sample {
    pub workload: &'static str,
    pub forwarder: &'static str,
    pub rep: usize,
    pub quiet: Quiet,
    pub wall_s: f64,
    /// On-CPU time of the forwarder's processes during the step.
    pub forwarder_cpu_s: f64,
    /// Busy CPU time of the whole machine (client, server, broker, kernel,
    /// and whatever else ran) during the step.
    pub system_cpu_s: f64,
    /// Of that, the kernel's own work: softirq, hardirq and kworkers
    /// (system::kernel_work_s).
    pub kernel_work_s: f64,
    /// The figures the report shows, derived from the rest.
    pub metrics: BTreeMap<&'static str, f64>,
    /// The load generator's own JSON line, as printed.
    pub client: Value,
}

/// The workloads, in the order they run. TIME_WAIT sockets are kept out of
/// the idle workload's kernel memory, but idle still runs before the
/// connection storm so the machine has fewer of them around.
pub const BULK1: &str = "bulk, 1 connection";
pub const BULK4: &str = "bulk, 4 connections";
/// Bulk over one connection measured by iperf3, a tool nobody here wrote,
/// with no PROXY header (iperf3's server could not read one).
pub const IPERF: &str = "bulk, 1 connection, iperf3";
pub const PINGPONG: &str = "ping-pong";
pub const IDLE: &str = "idle";
pub const CONNRATE: &str = "connection rate";
pub const MQTT0: &str = "MQTT QoS 0";
pub const MQTT1: &str = "MQTT QoS 1";
pub const MQTT_PACED: &str = "MQTT QoS 0, paced";
/// Short MQTT sessions (connect, CONNECT, CONNACK, DISCONNECT): a
/// reconnect storm after an outage.
pub const MQTT_STORM: &str = "MQTT reconnect storm";
/// The same storm through forwarders that read the CONNECT and route by
/// client (issue 13), in front of three brokers.
pub const MQTT_AWARE: &str = "MQTT reconnect storm, MQTT-aware";
/// Thousands of connected devices, each publishing now and then.
pub const FLEET: &str = "MQTT fleet";
/// Full TLS handshakes (no resumption) through forwarders terminating TLS,
/// each followed by 8 bytes echoed by the server and a close (issue 14).
pub const TLS_ECDSA: &str = "TLS handshakes, ECDSA P-256";
pub const TLS_RSA: &str = "TLS handshakes, RSA 2048";
/// The same measured by `openssl s_time -new`, a client nobody here wrote,
/// one handshake at a time: a check on the load generator's figures.
pub const TLS_ECDSA_STIME: &str = "TLS handshakes, ECDSA P-256, openssl s_time";
pub const TLS_RSA_STIME: &str = "TLS handshakes, RSA 2048, openssl s_time";
/// Bulk through one TLS connection the forwarder terminates.
pub const TLS_BULK: &str = "TLS bulk, 1 connection";
/// Bulk through one TLS connection the forwarder passes through, routed
/// by server name, to the server terminating it.
pub const TLS_PASSTHROUGH: &str = "TLS passthrough bulk, 1 connection";

/// Whether `workload` runs through `kind` (every forwarder of its phase
/// but for s_time, a check run through direct and splicer only).
pub fn runs_through(workload: &str, kind: Kind) -> bool {
    !matches!(workload, TLS_ECDSA_STIME | TLS_RSA_STIME)
        || matches!(kind, Kind::Direct | Kind::Splicer)
}

/// How long the fleet sits connected before it publishes: past `--handoff
/// auto`'s idle handoff (2 s without a byte, checked every 2 s), as a
/// fleet that has been up for a while is.
pub const FLEET_SETTLE: Duration = Duration::from_secs(5);

/// One step's readings around its run.
struct Measured {
    quiet: Quiet,
    wall: Duration,
    /// On-CPU seconds of the forwarder's processes.
    cpu: f64,
    /// Busy CPU seconds of the whole machine.
    sys: f64,
    /// Of those, the kernel's own work (softirq, kworkers).
    kernel: f64,
}

impl Measured {
    fn sample(
        self,
        workload: &'static str,
        fwd: &Forwarder,
        rep: usize,
        metrics: BTreeMap<&'static str, f64>,
        client: Value,
    ) -> Sample {
        Sample {
            workload,
            forwarder: fwd.kind.name(),
            rep,
            quiet: self.quiet,
            wall_s: self.wall.as_secs_f64(),
            forwarder_cpu_s: self.cpu,
            system_cpu_s: self.sys,
            kernel_work_s: self.kernel,
            metrics,
            client,
        }
    }
}

pub struct Ctx<'a> {
    pub loadgen: &'a Path,
    pub plan: &'a Plan,
    pub setup: &'a Setup,
}

impl Ctx<'_> {
    /// Runs one workload step through `fwd`.
    pub fn run(&self, workload: &'static str, fwd: &mut Forwarder, rep: usize) -> Result<Sample> {
        let p = self.plan;
        let target = fwd.addr.to_string();
        let secs = format!("{}s", p.max_time.as_secs());
        let args: Vec<String> = match workload {
            BULK1 | BULK4 => {
                let conns = if workload == BULK1 { 1 } else { 4 };
                let bytes = p.bulk_bytes.to_string();
                strings(&["bulk", "--target", &target, "--bytes", &bytes])
                    .into_iter()
                    .chain(strings(&[
                        "--conns",
                        &conns.to_string(),
                        "--max-time",
                        &secs,
                    ]))
                    .collect()
            }
            PINGPONG => strings(&[
                "pingpong",
                "--target",
                &target,
                "--rounds",
                &p.rounds.to_string(),
                "--max-time",
                &secs,
            ]),
            CONNRATE | MQTT_STORM | MQTT_AWARE => {
                let mut a = strings(&[
                    "connrate",
                    "--target",
                    &target,
                    "--conns",
                    &p.short_conns.to_string(),
                    "--concurrency",
                    &p.concurrency.to_string(),
                    "--max-time",
                    &secs,
                ]);
                if workload != CONNRATE {
                    a.push("--mqtt".into());
                }
                a
            }
            MQTT0 | MQTT1 | MQTT_PACED => {
                let qos = usize::from(workload == MQTT1);
                let (messages, rate) = match workload {
                    MQTT_PACED => (p.mqtt_paced.0, p.mqtt_paced.1),
                    _ => (p.mqtt_messages[qos], 0.0),
                };
                strings(&[
                    "mqtt",
                    "--target",
                    &target,
                    "--publishers",
                    &p.mqtt_publishers.to_string(),
                    "--messages",
                    &messages.to_string(),
                    "--qos",
                    &qos.to_string(),
                    "--rate",
                    &rate.to_string(),
                    "--max-time",
                    &secs,
                ])
            }
            TLS_ECDSA | TLS_RSA => {
                let mut a = self.tls_client("tls-handshakes", &target)?;
                a.extend(strings(&[
                    "--conns",
                    &p.tls_handshakes.to_string(),
                    "--concurrency",
                    &p.concurrency.to_string(),
                    "--max-time",
                    &secs,
                ]));
                a
            }
            TLS_BULK | TLS_PASSTHROUGH => {
                let mut a = self.tls_client("tls-bulk", &target)?;
                a.extend(strings(&[
                    "--bytes",
                    &p.bulk_bytes.to_string(),
                    "--max-time",
                    &secs,
                ]));
                a
            }
            TLS_ECDSA_STIME | TLS_RSA_STIME => return self.s_time(workload, fwd, rep),
            IDLE => return self.idle(fwd, rep),
            FLEET => return self.fleet(fwd, rep),
            IPERF => return self.iperf(fwd, rep),
            _ => bail!("unknown workload {workload}"),
        };
        let name = fwd.kind.name();
        let (at, client) = self.measure(fwd, || {
            run_client(self.loadgen, &args, p.max_time + Duration::from_secs(60))
                .with_context(|| format!("{workload} through {name}"))
        })?;
        let (cpu, sys, kernel) = (at.cpu, at.sys, at.kernel);
        let num = |k: &str| client.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        let mut m = BTreeMap::new();
        match workload {
            BULK1 | BULK4 | TLS_BULK | TLS_PASSTHROUGH => {
                let gb = num("bytes") / 1e9;
                m.insert("gb_per_s", num("gb_per_s"));
                m.insert("forwarder_cpu_s_per_gb", cpu / gb);
                m.insert("system_cpu_s_per_gb", sys / gb);
                m.insert("kernel_work_s_per_gb", kernel / gb);
            }
            PINGPONG => {
                let n = num("rounds");
                m.insert("p50_us", num("p50_us"));
                m.insert("p99_us", num("p99_us"));
                m.insert("forwarder_cpu_us_per_round_trip", cpu * 1e6 / n);
                m.insert("system_cpu_us_per_round_trip", sys * 1e6 / n);
                m.insert("kernel_work_us_per_round_trip", kernel * 1e6 / n);
            }
            CONNRATE | MQTT_STORM | MQTT_AWARE => {
                let n = num("conns");
                m.insert("conns_per_s", num("conns_per_s"));
                m.insert("p99_us", num("p99_us"));
                m.insert("forwarder_cpu_us_per_conn", cpu * 1e6 / n);
                m.insert("system_cpu_us_per_conn", sys * 1e6 / n);
                m.insert("kernel_work_us_per_conn", kernel * 1e6 / n);
            }
            TLS_ECDSA | TLS_RSA => {
                m.insert("p99_us", num("p99_us"));
                per_handshake(&mut m, num("conns"), num("conns_per_s"), &at);
            }
            _ => per_message(&mut m, &client, &at),
        }
        Ok(at.sample(workload, fwd, rep, m, client))
    }

    /// The load generator's TLS client `cmd` toward `target`, trusting
    /// the phase's CA.
    fn tls_client(&self, cmd: &str, target: &str) -> Result<Vec<String>> {
        let cert = self
            .setup
            .cert()
            .context("a TLS workload outside a TLS phase")?;
        Ok(strings(&[
            cmd,
            "--target",
            target,
            "--ca",
            &cert.ca.display().to_string(),
            "--server-name",
            SERVER_NAME,
        ]))
    }

    /// `openssl s_time -new` through `fwd` for a few seconds: full
    /// handshakes one after another, offering the load generator's cipher
    /// suite (the certificate goes unchecked), then a close.
    fn s_time(&self, workload: &'static str, fwd: &mut Forwarder, rep: usize) -> Result<Sample> {
        let secs = if self.plan.quick { "1" } else { "3" };
        let addr = fwd.addr.to_string();
        let (at, (status, out, err)) = self.measure(fwd, || {
            run_with_timeout(
                Command::new("openssl").args([
                    "s_time",
                    "-connect",
                    &addr,
                    "-new",
                    "-time",
                    secs,
                    "-tls1_3",
                    "-ciphersuites",
                    SUITE,
                ]),
                Duration::from_secs(60),
            )
            .context("openssl s_time")
        })?;
        // Its last line: "N connections in T real seconds, ..." (T in whole
        // seconds: the rate is taken over the measured time instead).
        let n = out
            .lines()
            .find(|l| l.contains(" connections in ") && l.contains(" real seconds"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok());
        let Some(n) = n.filter(|_| status.success()) else {
            bail!(
                "openssl s_time through {} failed ({status}):\n{out}{err}",
                fwd.kind.name()
            );
        };
        let mut m = BTreeMap::new();
        per_handshake(&mut m, n, n / at.wall.as_secs_f64(), &at);
        let client = serde_json::json!({ "connections": n });
        Ok(at.sample(workload, fwd, rep, m, client))
    }

    /// Waits for quiet, then runs `step` between two readings of the
    /// forwarder's and the machine's CPU; the forwarder must still be alive.
    fn measure<T>(
        &self,
        fwd: &mut Forwarder,
        step: impl FnOnce() -> Result<T>,
    ) -> Result<(Measured, T)> {
        let quiet = wait_quiet(self.plan.quiet_wait);
        let (cpu0, sys0, k0, t0) = (fwd_cpu(fwd), busy_cpu_s(), kernel_work_s(), Instant::now());
        let out = step()?;
        let at = Measured {
            quiet,
            wall: t0.elapsed(),
            cpu: fwd_cpu(fwd) - cpu0,
            sys: busy_cpu_s() - sys0,
            kernel: kernel_work_s() - k0,
        };
        fwd.check_alive()?;
        Ok((at, out))
    }

    /// iperf3's client through `fwd` to the iperf3 server behind it, for a
    /// fixed time with 128 KiB writes; the rate is what its server received.
    fn iperf(&self, fwd: &mut Forwarder, rep: usize) -> Result<Sample> {
        let p = self.plan;
        let secs = if p.quick { "2" } else { "4" };
        let (ip, port) = (fwd.addr.ip().to_string(), fwd.addr.port().to_string());
        let (at, (status, out, err)) = self.measure(fwd, || {
            run_with_timeout(
                Command::new("iperf3")
                    .args(["-c", &ip, "-p", &port, "-t", secs, "-l", "128K", "-J"]),
                Duration::from_secs(60),
            )
            .context("iperf3")
        })?;
        if !status.success() {
            bail!(
                "iperf3 through {} failed ({status}):\n{out}{err}",
                fwd.kind.name()
            );
        }
        let client: Value = serde_json::from_str(&out).context("iperf3's JSON")?;
        let received = &client["end"]["sum_received"];
        let (bytes, bps) = (
            received["bytes"].as_f64(),
            received["bits_per_second"].as_f64(),
        );
        let (Some(bytes), Some(bps)) = (bytes, bps) else {
            bail!(
                "iperf3 through {}: no end.sum_received in its output",
                fwd.kind.name()
            );
        };
        let gb = bytes / 1e9;
        let mut m = BTreeMap::new();
        m.insert("gb_per_s", bps / 8e9);
        m.insert("forwarder_cpu_s_per_gb", at.cpu / gb);
        m.insert("system_cpu_s_per_gb", at.sys / gb);
        m.insert("kernel_work_s_per_gb", at.kernel / gb);
        let client = serde_json::json!({ "bytes": bytes, "bits_per_second": bps });
        Ok(at.sample(IPERF, fwd, rep, m, client))
    }

    /// Idle: a fresh forwarder (memory a previous step freed would be
    /// reused and hide the cost), then the client opens and holds the
    /// connections while memory is read.
    fn idle(&self, fwd: &mut Forwarder, rep: usize) -> Result<Sample> {
        let n = self.plan.idle_conns;
        fwd.restart(self.setup)?;
        // splicer returns freed heap to the system (malloc_trim) at most
        // every 5 s after it accepted a connection: one connection now, and
        // a wait past that, so "before" is read on a trimmed heap as "holding"
        // is below. Without it, the trim of start-up memory fell between the
        // two readings and made the difference negative.
        drop(std::net::TcpStream::connect(fwd.addr));
        thread::sleep(SETTLE);
        let quiet = wait_quiet(self.plan.quiet_wait);
        let rss = |f: &Forwarder| f.pid().map(tree_rss_bytes).unwrap_or(0) as f64;
        let (rss0, kmem0) = (rss(fwd), kernel_mem_bytes() as f64);
        let (cpu0, sys0, t0) = (fwd_cpu(fwd), busy_cpu_s(), Instant::now());
        let mut held = Held::spawn(
            self.loadgen,
            &["idle", "--target", &fwd.addr.to_string(), "--conns", &n.to_string()],
        )?;
        let client = held.line(Duration::from_secs(300), "held its connections")?;
        let (cpu, sys) = (fwd_cpu(fwd) - cpu0, busy_cpu_s() - sys0);
        let wall = t0.elapsed();
        // Let lazily freed memory (RCU, deferred work) settle, and the
        // connections sit idle past `--handoff auto`'s handoff (2 s idle,
        // checked every 2 s) and splicer's next heap trim (every 5 s), as
        // idle MQTT clients do, before reading.
        thread::sleep(SETTLE);
        let (rss1, kmem1) = (rss(fwd), kernel_mem_bytes() as f64);
        fwd.check_alive()?;
        // Let go: a line on stdin closes everything.
        held.go()?;
        held.finish()?;
        let mut m = BTreeMap::new();
        m.insert("forwarder_rss_bytes_per_conn", (rss1 - rss0) / n as f64);
        m.insert("kernel_bytes_per_conn", (kmem1 - kmem0) / n as f64);
        m.insert("forwarder_rss_before_bytes", rss0);
        m.insert("forwarder_rss_holding_bytes", rss1);
        m.insert("forwarder_cpu_us_per_conn", cpu * 1e6 / n as f64);
        let at = Measured {
            quiet,
            wall,
            cpu,
            sys,
            kernel: f64::NAN,
        };
        Ok(at.sample(IDLE, fwd, rep, m, client))
    }
}

impl Ctx<'_> {
    /// The fleet: the client connects every device and waits; after
    /// FLEET_SETTLE the measurement starts and the devices publish, paced.
    fn fleet(&self, fwd: &mut Forwarder, rep: usize) -> Result<Sample> {
        let p = self.plan;
        let (conns, rate, secs) = p.fleet;
        let mut held = Held::spawn(
            self.loadgen,
            &[
                "fleet",
                "--target",
                &fwd.addr.to_string(),
                "--conns",
                &conns.to_string(),
                "--rate",
                &rate.to_string(),
                "--duration",
                &format!("{secs}s"),
            ],
        )?;
        held.line(Duration::from_secs(300), "connected the fleet")?;
        thread::sleep(FLEET_SETTLE);
        let (at, client) = self.measure(fwd, || {
            held.go()?;
            held.line(Duration::from_secs(secs + 60), "reported")
        })?;
        held.finish()?;
        let mut m = BTreeMap::new();
        per_message(&mut m, &client, &at);
        Ok(at.sample(FLEET, fwd, rep, m, client))
    }
}

/// The figures of an MQTT step: rate, latency, and CPU per message
/// received.
fn per_message(m: &mut BTreeMap<&'static str, f64>, client: &Value, at: &Measured) {
    let num = |k: &str| client.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let n = num("received");
    m.insert("msgs_per_s", num("msgs_per_s"));
    m.insert("p50_us", num("p50_us"));
    m.insert("p99_us", num("p99_us"));
    m.insert("forwarder_cpu_us_per_msg", at.cpu * 1e6 / n);
    m.insert("system_cpu_us_per_msg", at.sys * 1e6 / n);
    m.insert("kernel_work_us_per_msg", at.kernel * 1e6 / n);
}

/// The figures of a handshake step: `n` handshakes at `rate`, and what
/// each cost.
fn per_handshake(m: &mut BTreeMap<&'static str, f64>, n: f64, rate: f64, at: &Measured) {
    m.insert("handshakes_per_s", rate);
    m.insert("forwarder_cpu_us_per_handshake", at.cpu * 1e6 / n);
    m.insert("system_cpu_us_per_handshake", at.sys * 1e6 / n);
    m.insert("kernel_work_us_per_handshake", at.kernel * 1e6 / n);
}

/// A load generator client that sets up, prints a `ready` line and waits
/// for a line on its stdin: set-up stays out of what is measured.
struct Held {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Option<thread::JoinHandle<String>>,
}

impl Held {
    fn spawn(loadgen: &Path, args: &[&str]) -> Result<Held> {
        let mut child = Command::new(loadgen)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start the load generator")?;
        let lines = line_reader(child.stdout.take().unwrap());
        let stderr = read_in_background(child.stderr.take().unwrap());
        Ok(Held {
            child,
            lines,
            stderr: Some(stderr),
        })
    }

    /// Its next JSON line; on a timeout or exit, its stderr in the error.
    fn line(&mut self, timeout: Duration, what: &str) -> Result<Value> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => serde_json::from_str(&line)
                .with_context(|| format!("load generator printed {line:?}")),
            Err(_) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("the load generator never {what}:\n{}", self.stderr())
            }
        }
    }

    /// The line on stdin that lets it go on.
    fn go(&mut self) -> Result<()> {
        let stdin = self.child.stdin.as_mut().context("stdin already closed")?;
        Ok(stdin.write_all(b"\n")?)
    }

    /// Waits for it to exit; it exits non-zero when anything was lost.
    fn finish(mut self) -> Result<()> {
        drop(self.child.stdin.take());
        let status = self.child.wait()?;
        if !status.success() {
            bail!("load generator failed ({status}):\n{}", self.stderr());
        }
        Ok(())
    }

    /// What it wrote to stderr (once it has exited).
    fn stderr(&mut self) -> String {
        self.stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn fwd_cpu(f: &Forwarder) -> f64 {
    f.pid().map(tree_cpu_s).unwrap_or(0.0)
}

/// Runs the client to completion (killed after `timeout`) and parses its
/// JSON line. It exits non-zero when anything was lost, which fails the run.
fn run_client(loadgen: &Path, args: &[String], timeout: Duration) -> Result<Value> {
    let (status, out, err) = run_with_timeout(
        Command::new(loadgen)
            .args(args)
            .env("RUST_LIB_BACKTRACE", "0"),
        timeout,
    )
    .context("the load generator")?;
    if !status.success() {
        bail!("load generator {args:?} failed ({status}):\n{err}");
    }
    let line = out.lines().last().unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("load generator printed {out:?}"))
}

fn line_reader(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}
