//! `cargo xtask bench`: splicer side by side with a direct connection,
//! HAProxy and nginx, on loopback, in one run. Every forwarder runs at once
//! on its own port in front of one server (the load generator's), and the
//! steps take turns between them, so slow drift on a shared machine spreads
//! over all of them instead of landing on one.
mod chart;
mod forwarders;
mod procs;
mod report;
mod system;
mod tls;
mod workloads;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use splicer_testkit::{free_port, Proc};

use crate::{build, install, root, run_cmd};
use forwarders::{Forwarder, Kind, Mode, Setup, ALL};
use tls::KeyType;
use workloads::{
    runs_through, Ctx, Sample, BULK1, BULK4, CONNRATE, FLEET, IDLE, IPERF, MQTT0, MQTT1,
    MQTT_AWARE, MQTT_PACED, MQTT_STORM, PINGPONG, TLS_BULK, TLS_ECDSA, TLS_ECDSA_STIME,
    TLS_PASSTHROUGH, TLS_RSA, TLS_RSA_STIME,
};

/// The load generator's server (PROXY header stripped, then discard/echo).
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 2);
/// mosquitto, for the MQTT workload.
const BROKER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 4);
/// How long the server, the broker or a forwarder may take to listen.
const START: Duration = Duration::from_secs(10);

/// Sizes of one run; `--quick` shrinks them for a smoke check.
#[derive(Serialize)]
pub struct Plan {
    pub quick: bool,
    /// Each step is repeated this often; the report shows the median and
    /// the range.
    pub reps: usize,
    /// Bulk: bytes in total (through 1 connection, or split over 4).
    pub bulk_bytes: u64,
    pub rounds: usize,
    pub short_conns: usize,
    pub concurrency: usize,
    pub idle_conns: usize,
    pub mqtt_publishers: usize,
    /// Messages at QoS 0 and at QoS 1, as fast as they go.
    pub mqtt_messages: [u64; 2],
    /// Messages at QoS 0, paced at this many per second: latency below
    /// saturation (at saturation it is mostly queueing).
    pub mqtt_paced: (u64, f64),
    /// The fleet: connections, messages per second from all of them, and
    /// seconds of publishing.
    pub fleet: (usize, f64, u64),
    /// Full TLS handshakes per step (`concurrency` at a time).
    pub tls_handshakes: usize,
    /// No step runs longer (it stops early and reports what it did).
    #[serde(with = "secs")]
    pub max_time: Duration,
    /// The longest wait for the machine to go quiet before a step.
    #[serde(with = "secs")]
    pub quiet_wait: Duration,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                reps: 1,
                bulk_bytes: 200_000_000,
                rounds: 2_000,
                short_conns: 500,
                concurrency: 32,
                idle_conns: 1_000,
                mqtt_publishers: 10,
                mqtt_messages: [5_000, 2_000],
                mqtt_paced: (2_000, 2_000.0),
                fleet: (500, 250.0, 4),
                tls_handshakes: 500,
                max_time: Duration::from_secs(10),
                quiet_wait: Duration::from_secs(1),
            }
        } else {
            Plan {
                quick,
                reps: 3,
                bulk_bytes: 2_000_000_000,
                rounds: 20_000,
                short_conns: 5_000,
                concurrency: 32,
                idle_conns: 20_000,
                mqtt_publishers: 50,
                mqtt_messages: [100_000, 30_000],
                mqtt_paced: (15_000, 5_000.0),
                // 9,000 devices (each forwarder holds 2 fds per connection
                // under a 20,000 limit), each publishing every 3 s.
                fleet: (9_000, 3_000.0, 10),
                tls_handshakes: 5_000,
                max_time: Duration::from_secs(30),
                quiet_wait: Duration::from_secs(2),
            }
        }
    }
}

/// Installs what is missing, builds splicer and the load generator, runs
/// every step (or those whose workload's name contains `only`) and writes
/// the report to `out`; returns the Markdown.
pub fn run(quick: bool, only: Option<&str>, out: &Path) -> Result<String> {
    let started = Instant::now();
    install::bench_peers()?;
    // SPLICER_BIN benches a given build (an older one, for comparison)
    // instead of building the work tree's; it must embed the eBPF object.
    let splicer = match std::env::var_os("SPLICER_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => {
            install::toolchain()?;
            build::all(true)?
        }
    };
    run_cmd(build::cargo().current_dir(root()).args([
        "build",
        "--release",
        "-p",
        "splicer-bench",
    ]))?;
    let loadgen = root().join("target/release/splicer-bench");
    let mut plan = Plan::new(quick);
    // A forwarder holds two fds per connection; children inherit the limit.
    // Where it can't be raised far enough, hold as many as it allows.
    let nofile = system::raise_nofile(2 * plan.idle_conns as u64 + 10_000)?;
    let fd_room = (nofile as usize).saturating_sub(2_000) / 2;
    if fd_room < plan.idle_conns {
        eprintln!(
            "bench: open-files limit {nofile} (not raisable here): idle holds {fd_room} connections, not {}",
            plan.idle_conns
        );
        plan.idle_conns = fd_room;
    }
    plan.fleet.0 = plan.fleet.0.min(fd_room);
    let dir = std::env::temp_dir().join(format!("splicer-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    eprintln!("bench: logs and configs in {}", dir.display());

    let machine = system::machine();
    let step = |name: &str| {
        eprintln!(
            "bench: {name} ({:.0} s in)",
            started.elapsed().as_secs_f64()
        )
    };
    let run = Run {
        plan: &plan,
        loadgen: &loadgen,
        splicer: &splicer,
        dir: &dir,
        nofile,
        step: &step,
        only: only.map(str::to_lowercase),
    };
    let mut samples = tcp_phase(&run)?;
    samples.extend(iperf_phase(&run)?);
    samples.extend(mqtt_phase(&run)?);
    samples.extend(tls_phase(&run)?);
    if samples.is_empty() {
        bail!("no workload's name contains {only:?}");
    }

    let report = report::Report {
        machine,
        plan,
        workers: forwarders::workers(),
        nofile,
        total_s: started.elapsed().as_secs_f64(),
        only: only.map(str::to_string),
        samples,
    };
    let md = report::write(out, &report)?;
    eprintln!(
        "bench: done in {:.0} s; wrote {}/bench.md, bench.json, bench.svg",
        report.total_s,
        out.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(md)
}

/// What every phase of one run shares.
struct Run<'a> {
    plan: &'a Plan,
    loadgen: &'a Path,
    splicer: &'a Path,
    dir: &'a Path,
    nofile: u64,
    step: &'a dyn Fn(&str),
    /// `--only`, lowercase.
    only: Option<String>,
}

impl Run<'_> {
    /// Those of `workloads` this run runs.
    fn wanted(&self, workloads: &[&'static str]) -> Vec<&'static str> {
        workloads
            .iter()
            .copied()
            .filter(|w| {
                self.only
                    .as_ref()
                    .is_none_or(|o| w.to_lowercase().contains(o))
            })
            .collect()
    }

    /// Whether this run runs none of `workloads`: their phase's set-up
    /// can be skipped.
    fn skips(&self, workloads: &[&'static str]) -> bool {
        self.wanted(workloads).is_empty()
    }

    /// Every forwarder started in front of `upstream` (already listening),
    /// then each of `workloads` in turn.
    fn phase(
        &self,
        upstream: SocketAddr,
        send_proxy: bool,
        max_conns: usize,
        workloads: &[&'static str],
    ) -> Result<Vec<Sample>> {
        self.phase_with(
            upstream,
            Mode::Plain,
            &ALL,
            send_proxy,
            max_conns,
            workloads,
        )
    }

    /// As `phase`, with the forwarders of `kinds` set up as `mode` says.
    fn phase_with(
        &self,
        upstream: SocketAddr,
        mode: Mode,
        kinds: &[Kind],
        send_proxy: bool,
        max_conns: usize,
        workloads: &[&'static str],
    ) -> Result<Vec<Sample>> {
        let workloads = self.wanted(workloads);
        if workloads.is_empty() {
            return Ok(Vec::new());
        }
        let setup = Setup {
            dir: self.dir.to_path_buf(),
            splicer: self.splicer.to_path_buf(),
            upstream,
            send_proxy,
            max_conns,
            nofile: self.nofile,
            mode,
        };
        let ctx = Ctx {
            loadgen: self.loadgen,
            plan: self.plan,
            setup: &setup,
        };
        let mut fwds = start_all(&setup, kinds)?;
        let mut samples = Vec::new();
        for w in workloads {
            (self.step)(w);
            samples.extend(rounds(&ctx, w, &mut fwds)?);
        }
        Ok(samples)
    }
}

/// Bulk, ping-pong, idle and connection rate, against the load
/// generator's server, every forwarder sending a PROXY v1 header.
fn tcp_phase(run: &Run) -> Result<Vec<Sample>> {
    let workloads = [BULK1, BULK4, PINGPONG, IDLE, CONNRATE];
    if run.skips(&workloads) {
        return Ok(Vec::new());
    }
    let server_addr = SocketAddr::from((SERVER_IP, free_port(SERVER_IP)));
    let mut server = Proc::spawn(
        "server",
        run.dir,
        Command::new(run.loadgen).args(["server", "--listen", &server_addr.to_string()]),
    )?;
    server.wait_listening(server_addr, START)?;
    let max_conns = run.plan.idle_conns + 100;
    run.phase(server_addr, true, max_conns, &workloads)
}

/// Bulk measured by iperf3 through every forwarder to an iperf3 server,
/// with no PROXY header, beside the load generator's own figure: if the
/// two disagree on `direct`, the run was capped (report.rs says so).
fn iperf_phase(run: &Run) -> Result<Vec<Sample>> {
    if run.skips(&[IPERF]) {
        return Ok(Vec::new());
    }
    let server_addr = SocketAddr::from((SERVER_IP, free_port(SERVER_IP)));
    let port = server_addr.port().to_string();
    let mut server = Proc::spawn(
        "iperf3",
        run.dir,
        Command::new("iperf3").args(["-s", "-B", &SERVER_IP.to_string(), "-p", &port]),
    )?;
    server.wait_listening(server_addr, START)?;
    let samples = run.phase(server_addr, false, 100, &[IPERF])?;
    server.check_alive()?;
    Ok(samples)
}

/// MQTT through every forwarder to mosquitto. Debian's mosquitto (2.0)
/// cannot read PROXY headers, so in this phase no forwarder sends one.
/// Then the reconnect storm again through the MQTT-aware set-ups, in front
/// of three of mosquitto's listeners (one process: the brokers' CPU is the
/// same whichever a client lands on).
fn mqtt_phase(run: &Run) -> Result<Vec<Sample>> {
    let workloads = [MQTT0, MQTT1, MQTT_PACED, MQTT_STORM, FLEET];
    if run.skips(&workloads) && run.skips(&[MQTT_AWARE]) {
        return Ok(Vec::new());
    }
    let brokers: Vec<SocketAddr> = (0..3)
        .map(|_| SocketAddr::from((BROKER_IP, free_port(BROKER_IP))))
        .collect();
    let broker_addr = brokers[0];
    let conf = run.dir.join("mosquitto.conf");
    let listeners: String = brokers
        .iter()
        .map(|b| format!("listener {} {}\n", b.port(), b.ip()))
        .collect();
    // Nagle off, as brokers run in production (EMQX's default), so latency
    // is the forwarder's and not a delayed ACK's.
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings false\n{listeners}allow_anonymous true\npersistence false\n\
             set_tcp_nodelay true\nmax_queued_messages 100000\n\
             log_dest stderr\nlog_type error\nlog_type warning\n"
        ),
    )?;
    let mut broker = Proc::spawn(
        "mosquitto",
        run.dir,
        Command::new("mosquitto").arg("-c").arg(&conf),
    )?;
    broker.wait_listening(broker_addr, START)?;
    let max_conns = run.plan.mqtt_publishers.max(run.plan.fleet.0) + 100;
    let mut samples = run.phase(broker_addr, false, max_conns, &workloads)?;
    samples.extend(run.phase_with(
        broker_addr,
        Mode::MqttAware(brokers),
        &ALL,
        false,
        max_conns,
        &[MQTT_AWARE],
    )?);
    broker.check_alive()?;
    Ok(samples)
}

/// The forwarders that terminate TLS. splicer's other modes and HAProxy's
/// splicing would relay terminated connections just as these do.
const TERMINATING: [Kind; 4] = [Kind::Direct, Kind::Splicer, Kind::Haproxy, Kind::Nginx];

/// TLS (issue 14), with certificates made for the run. For each key type,
/// handshakes through every forwarder terminating TLS in front of the
/// server (a PROXY v1 header, then plaintext), and with ECDSA bulk too;
/// then bulk through every forwarder passing TLS through, routed by server
/// name, to the server's TLS listener. Direct goes to that listener.
fn tls_phase(run: &Run) -> Result<Vec<Sample>> {
    let ecdsa = [TLS_ECDSA, TLS_ECDSA_STIME, TLS_BULK];
    let rsa = [TLS_RSA, TLS_RSA_STIME];
    if run.skips(&ecdsa) && run.skips(&rsa) && run.skips(&[TLS_PASSTHROUGH]) {
        return Ok(Vec::new());
    }
    let ecdsa_cert = tls::make(run.dir, KeyType::EcdsaP256)?;
    let rsa_cert = tls::make(run.dir, KeyType::Rsa2048)?;
    let mut samples = Vec::new();
    for (cert, workloads) in [(&ecdsa_cert, &ecdsa[..]), (&rsa_cert, &rsa[..])] {
        if run.skips(workloads) {
            continue;
        }
        let (mut server, plain, sink) = tls_server(run, cert)?;
        let max_conns = run.plan.concurrency + 100;
        let mode = Mode::TlsTerminate {
            cert: cert.clone(),
            sink,
        };
        samples.extend(run.phase_with(plain, mode, &TERMINATING, true, max_conns, workloads)?);
        server.check_alive()?;
    }
    if !run.skips(&[TLS_PASSTHROUGH]) {
        let (mut server, _, sink) = tls_server(run, &ecdsa_cert)?;
        let mode = Mode::TlsPassthrough { cert: ecdsa_cert };
        samples.extend(run.phase_with(sink, mode, &ALL, true, 100, &[TLS_PASSTHROUGH])?);
        server.check_alive()?;
    }
    Ok(samples)
}

/// The load generator's server with a TLS listener serving `cert`
/// besides its plain one; returns both addresses, plain first.
fn tls_server(run: &Run, cert: &tls::Cert) -> Result<(Proc, SocketAddr, SocketAddr)> {
    let plain = SocketAddr::from((SERVER_IP, free_port(SERVER_IP)));
    let sink = SocketAddr::from((SERVER_IP, free_port(SERVER_IP)));
    let mut server = Proc::spawn(
        "server-tls",
        run.dir,
        Command::new(run.loadgen)
            .args(["server", "--listen", &plain.to_string()])
            .args(["--tls-listen", &sink.to_string()])
            .arg("--tls-cert")
            .arg(&cert.cert)
            .arg("--tls-key")
            .arg(&cert.key),
    )?;
    server.wait_listening(plain, START)?;
    server.wait_listening(sink, START)?;
    Ok((server, plain, sink))
}

fn start_all(setup: &Setup, kinds: &[Kind]) -> Result<Vec<Forwarder>> {
    kinds
        .iter()
        .map(|&k| Forwarder::start(k, setup).with_context(|| format!("starting {}", k.name())))
        .collect()
}

/// `reps` rounds of one workload; each round visits every forwarder.
fn rounds(ctx: &Ctx, workload: &'static str, fwds: &mut [Forwarder]) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for rep in 0..ctx.plan.reps {
        for f in fwds.iter_mut().filter(|f| runs_through(workload, f.kind)) {
            out.push(ctx.run(workload, f, rep)?);
        }
    }
    Ok(out)
}

/// Where `cargo xtask bench` writes by default.
pub fn default_out() -> PathBuf {
    root().join("target/bench")
}
