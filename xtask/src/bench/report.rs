//! Turning samples into the report: medians and ranges, the Markdown
//! tables (with ratios to HAProxy's better mode and to direct), the targets
//! from issue 12, and the JSON and SVG files.
use std::{fmt::Write as _, fs, path::Path};

use anyhow::Result;
use serde::Serialize;
use serde_json::json;

use super::{
    chart,
    forwarders::{Kind, ALL},
    system::Machine,
    tls::{SERVER_NAME, SUITE},
    workloads::*,
    Plan,
};

#[derive(Serialize)]
pub struct Report {
    pub machine: Machine,
    pub plan: Plan,
    /// HAProxy's nbthread and nginx's worker_processes.
    pub workers: usize,
    /// RLIMIT_NOFILE every process in the run had.
    pub nofile: u64,
    pub total_s: f64,
    /// `--only`: the run's workloads were those whose name contains this.
    pub only: Option<String>,
    pub samples: Vec<Sample>,
}

#[derive(Serialize, Clone, Copy)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Report {
    /// Median and range of one figure over the repetitions.
    pub fn stat(&self, workload: &str, kind: Kind, metric: &str) -> Option<Stat> {
        let mut v: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.workload == workload && s.forwarder == kind.name())
            .filter_map(|s| s.metrics.get(metric).copied())
            .filter(|v| v.is_finite())
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }

    fn median(&self, workload: &str, kind: Kind, metric: &str) -> Option<f64> {
        self.stat(workload, kind, metric).map(|s| s.median)
    }

    /// The better of HAProxy's two modes for this figure (or the one
    /// mode a phase ran).
    pub fn haproxy_best(&self, workload: &str, metric: &str, better: Better) -> Option<f64> {
        [Kind::Haproxy, Kind::HaproxySplice]
            .into_iter()
            .filter_map(|k| self.median(workload, k, metric))
            .reduce(|a, b| match better {
                Better::Higher => a.max(b),
                Better::Lower => a.min(b),
            })
    }

    /// Whether `workload` ran through `kind` in this run.
    fn ran(&self, workload: &str, kind: Kind) -> bool {
        self.samples
            .iter()
            .any(|s| s.workload == workload && s.forwarder == kind.name())
    }
}

#[derive(Clone, Copy)]
pub enum Better {
    Higher,
    Lower,
}

/// What a figure is set beside.
#[derive(Clone, Copy, PartialEq)]
enum Ref {
    /// Its ratio to HAProxy's better mode.
    Haproxy,
    /// Its ratio to direct.
    Direct,
    /// Its difference from direct (latencies: what the hop adds).
    DirectDiff,
}

struct Col {
    metric: &'static str,
    title: &'static str,
    better: Better,
    refs: &'static [Ref],
}

const fn col(
    metric: &'static str,
    title: &'static str,
    better: Better,
    refs: &'static [Ref],
) -> Col {
    Col {
        metric,
        title,
        better,
        refs,
    }
}

use Better::*;
use Ref::*;

/// A rate (higher is better, set beside HAProxy and direct) and what each
/// unit of it cost: the forwarder's CPU (beside HAProxy's), the whole
/// machine's and the kernel's part of that (beside `machine`).
fn rate_and_costs(
    (rate, rate_title): (&'static str, &'static str),
    [own, machine, kernel]: [(&'static str, &'static str); 3],
    machine_ref: &'static [Ref],
) -> Vec<Col> {
    vec![
        col(rate, rate_title, Higher, &[Haproxy, Direct]),
        col(own.0, own.1, Lower, &[Haproxy]),
        col(machine.0, machine.1, Lower, machine_ref),
        col(kernel.0, kernel.1, Lower, machine_ref),
    ]
}

/// The tables: (workload, columns).
fn tables() -> Vec<(&'static str, Vec<Col>)> {
    let bulk = || {
        rate_and_costs(
            ("gb_per_s", "GB/s"),
            [
                ("forwarder_cpu_s_per_gb", "forwarder CPU s/GB"),
                ("system_cpu_s_per_gb", "system CPU s/GB"),
                ("kernel_work_s_per_gb", "of which kernel work s/GB"),
            ],
            &[Direct],
        )
    };
    // No latency at saturation: it is time spent queued (at QoS 1 in the
    // broker's queue for the subscriber), bounded by the window; the paced
    // table has the forwarders' own.
    let mqtt = || {
        rate_and_costs(
            ("msgs_per_s", "msg/s"),
            [
                ("forwarder_cpu_us_per_msg", "forwarder CPU µs/msg"),
                ("system_cpu_us_per_msg", "system CPU µs/msg"),
                ("kernel_work_us_per_msg", "of which kernel work µs/msg"),
            ],
            &[Haproxy],
        )
    };
    let connrate = || {
        rate_and_costs(
            ("conns_per_s", "conn/s"),
            [
                ("forwarder_cpu_us_per_conn", "forwarder CPU µs/conn"),
                ("system_cpu_us_per_conn", "system CPU µs/conn"),
                ("kernel_work_us_per_conn", "of which kernel work µs/conn"),
            ],
            &[Direct],
        )
    };
    let handshakes = || {
        rate_and_costs(
            ("handshakes_per_s", "handshakes/s"),
            [
                (
                    "forwarder_cpu_us_per_handshake",
                    "forwarder CPU µs/handshake",
                ),
                ("system_cpu_us_per_handshake", "system CPU µs/handshake"),
                (
                    "kernel_work_us_per_handshake",
                    "of which kernel work µs/handshake",
                ),
            ],
            &[Direct],
        )
    };
    // Through direct and splicer only: nothing to set beside HAProxy.
    let s_time = || {
        vec![
            col("handshakes_per_s", "handshakes/s", Higher, &[Direct]),
            col(
                "forwarder_cpu_us_per_handshake",
                "forwarder CPU µs/handshake",
                Lower,
                &[],
            ),
        ]
    };
    vec![
        (BULK1, bulk()),
        (IPERF, bulk()),
        (BULK4, bulk()),
        (
            PINGPONG,
            vec![
                col("p50_us", "p50 µs", Lower, &[DirectDiff, Haproxy]),
                col("p99_us", "p99 µs", Lower, &[DirectDiff]),
                col(
                    "forwarder_cpu_us_per_round_trip",
                    "forwarder CPU µs/round trip",
                    Lower,
                    &[Haproxy],
                ),
                col("system_cpu_us_per_round_trip", "system CPU µs/round trip", Lower, &[Direct]),
                col("kernel_work_us_per_round_trip", "of which kernel work µs/round trip", Lower, &[Direct]),
            ],
        ),
        (CONNRATE, connrate()),
        (
            IDLE,
            vec![
                col(
                    "forwarder_rss_bytes_per_conn",
                    "forwarder RSS B/conn",
                    Lower,
                    &[Haproxy],
                ),
                col(
                    "kernel_bytes_per_conn",
                    "kernel B/conn",
                    Lower,
                    &[Haproxy, DirectDiff],
                ),
            ],
        ),
        (MQTT0, mqtt()),
        (MQTT1, mqtt()),
        (
            MQTT_PACED,
            vec![
                col("p50_us", "p50 µs", Lower, &[DirectDiff]),
                col("p99_us", "p99 µs", Lower, &[DirectDiff]),
                col(
                    "forwarder_cpu_us_per_msg",
                    "forwarder CPU µs/msg",
                    Lower,
                    &[Haproxy],
                ),
            ],
        ),
        (MQTT_STORM, connrate()),
        (MQTT_AWARE, connrate()),
        (
            FLEET,
            // Paced, so latency instead of the rate, then the same costs.
            [
                col("p50_us", "p50 µs", Lower, &[DirectDiff]),
                col("p99_us", "p99 µs", Lower, &[DirectDiff, Haproxy]),
            ]
            .into_iter()
            .chain(mqtt().into_iter().skip(1))
            .collect(),
        ),
        (TLS_ECDSA, handshakes()),
        (TLS_RSA, handshakes()),
        (TLS_ECDSA_STIME, s_time()),
        (TLS_RSA_STIME, s_time()),
        (TLS_BULK, bulk()),
        (TLS_PASSTHROUGH, bulk()),
    ]
}

/// A number with about three significant digits.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        "n/a".into()
    } else if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        let decimals = (-a.log10().floor()) as usize + 2;
        format!("{v:.decimals$}")
    }
}

/// A difference, with its sign.
fn signed(v: f64) -> String {
    if v >= 0.0 {
        format!("+{}", num(v))
    } else {
        num(v)
    }
}

fn describe(workload: &str, p: &Plan, nofile: u64) -> String {
    let gb = p.bulk_bytes as f64 / 1e9;
    match workload {
        BULK1 => format!("{gb} GB client → server through one connection; the server counts the bytes and the count must match."),
        BULK4 => format!("{gb} GB in total, client → server, over 4 connections at once."),
        IPERF => format!(
            "iperf3 (Debian's) client → iperf3 server through the forwarder for {} s, 128 KiB writes, one connection, no PROXY header; \
             the rate its server received. System CPU includes iperf3's own.",
            if p.quick { 2 } else { 4 }
        ),
        PINGPONG => format!("{} round trips of 64 bytes on one connection (after 100 warm-up ones), Nagle off.", p.rounds),
        IDLE => format!(
            "{} connections held (as many as an open-files limit of {nofile} lets a forwarder hold, at 2 fds each, \
             or the plan's number), each checked end to end with a 1-byte echo, through a freshly started forwarder, \
             then left idle for 11 s (past `--handoff auto`'s handoff and splicer's next heap trim; the reading before \
             also waits for a trim). Forwarder RSS: VmRSS of its processes, holding minus before, per connection. \
             Kernel: pages held by all slab caches (socket structs, inodes, files, epoll, BPF map entries; \
             TIME_WAIT socks left out) plus TCP buffer pages, holding minus before, per connection, for the \
             whole machine: so it includes the client's and server's sockets, which is what direct shows.",
            p.idle_conns
        ),
        CONNRATE => format!(
            "{} short connections, {} at a time: connect, 9 bytes out, 8 back, close.",
            p.short_conns, p.concurrency
        ),
        MQTT0 | MQTT1 => format!(
            "mosquitto as the broker; {} publishers and one subscriber (to `bench/#`), all through the forwarder, \
             {} messages of 64 bytes as fast as they go, at most 500 on their way at once{}. \
             Latency at saturation is time spent queued, so it is in the paced table only. \
             No PROXY header in the MQTT workloads: Debian's mosquitto 2.0 cannot read one.",
            p.mqtt_publishers,
            p.mqtt_messages[usize::from(workload == MQTT1)],
            if workload == MQTT1 {
                ", each publisher waiting for its PUBACK before the next"
            } else {
                ""
            }
        ),
        MQTT_PACED => format!(
            "As QoS 0 above, but {} messages at a steady {} msg/s in total: the latency a forwarder adds below saturation.",
            p.mqtt_paced.0, p.mqtt_paced.1
        ),
        MQTT_STORM => format!(
            "mosquitto as the broker; {} MQTT sessions, {} at a time, each a new connection: CONNECT (a client ID of its own, \
             clean session), CONNACK, DISCONNECT, close. A reconnect storm: what a broker cluster's load balancer sees after an outage.",
            p.short_conns, p.concurrency
        ),
        MQTT_AWARE => format!(
            "The reconnect storm above ({} sessions, {} at a time), through each forwarder set up to route MQTT by client, \
             in front of three mosquitto listeners: splicer `protocol = \"mqtt\"`, `balance = \"client-id\"` (the CONNECT \
             read and checked before a broker is chosen); HAProxy `tcp-request content reject unless {{ req.payload(0,0),mqtt_is_valid }}` \
             with `balance hash req.payload(0,0),mqtt_field_value(connect,client_identifier)`; nginx, which cannot read MQTT, \
             `hash $remote_addr consistent`. Direct goes to the first listener.",
            p.short_conns, p.concurrency
        ),
        FLEET => format!(
            "mosquitto as the broker; {} MQTT clients connected through the forwarder and left for {} s, then publishing \
             {} messages of 64 bytes per second in total at QoS 0 for {} s, each client in turn (one message per client every {} s), \
             to one subscriber. Connecting is not measured. System CPU per message is the whole machine's busy time \
             (broker and load generator included) over the messages.",
            p.fleet.0,
            FLEET_SETTLE.as_secs(),
            p.fleet.1,
            p.fleet.2,
            num(p.fleet.0 as f64 / p.fleet.1)
        ),
        TLS_ECDSA | TLS_RSA => format!(
            "{} connections, {} at a time, each a full TLS 1.3 handshake (no resumption; {SUITE} with X25519, the only suite \
             and group the client offers) with an {} certificate signed by a CA of the same key type, which the client checks, then \
             8 bytes echoed by the server behind the forwarder, and a close. Each forwarder terminates TLS with the same \
             certificate and its own TLS defaults otherwise, and sends a PROXY v1 header and the plaintext upstream: splicer \
             `--tls-cert`/`--tls-key` (as it ships otherwise), HAProxy `bind … ssl crt`, nginx stream `listen … ssl`. Direct: \
             the client to the server's own TLS listener (rustls, the same certificate). The client is rustls (ring), a thread \
             per connection in flight; on 2 cores it takes a good part of the machine, so the rate is the machine's, and \
             forwarder CPU per handshake is the figure to compare.",
            p.tls_handshakes,
            p.concurrency,
            if workload == TLS_RSA { "RSA 2048" } else { "ECDSA P-256" },
        ),
        TLS_ECDSA_STIME | TLS_RSA_STIME => format!(
            "`openssl s_time -new -tls1_3 -ciphersuites {SUITE}` for {} s through direct and splicer, set up as above: one \
             handshake at a time, the certificate unchecked, no byte sent after it: it closes as soon as it has sent its \
             Finished (the forwarder still connects upstream and passes the close on). Its rate is bound by one \
             handshake's latency; it is here as a check on the table above from a client nobody here wrote.",
            if p.quick { 1 } else { 3 }
        ),
        TLS_BULK => format!(
            "{gb} GB client → server through one TLS connection the forwarder terminates (set up as for the handshakes, \
             ECDSA P-256): the client encrypts (rustls, AES-128-GCM), the forwarder decrypts and sends the plaintext upstream \
             after a PROXY v1 header, the server counts the bytes and the count, sent back through the forwarder, must match. \
             Direct: the client to the server's own TLS listener, which decrypts (rustls)."
        ),
        TLS_PASSTHROUGH => format!(
            "{gb} GB client → server through one TLS connection the forwarder passes on untouched, routed by server name: \
             splicer `--protocol tls-passthrough --sni {SERVER_NAME}=…`, HAProxy `req.ssl_sni` in mode tcp (with its splicing \
             options in `haproxy splice`), nginx `ssl_preread` with a `map`. Each sends a PROXY v1 header; the server behind \
             terminates TLS (rustls) and counts the bytes, which must match. Direct: the client straight to that server."
        ),
        _ => String::new(),
    }
}

pub fn markdown(r: &Report) -> String {
    let m = &r.machine;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Machine: {}, {} cores, {:.0} GiB, Linux {}; {}; {}; {}.",
        m.cpu, m.cores, m.memory_gib, m.kernel, m.haproxy, m.nginx, m.mosquitto
    );
    let _ = writeln!(
        s,
        "\nAll on loopback. HAProxy `nbthread {w}`, nginx `worker_processes {w}`, splicer's runtime {w} threads (its default: one per core). \
         Every forwarder sends a PROXY v1 header upstream (nginx can send no other). \
         Each figure is the median of {n} run{plural} with the range in brackets; the forwarders take turns within each round. \
         \"× HAProxy\" compares with the better of HAProxy's two modes for that figure; \
         forwarder CPU is the on-CPU time of its processes; system CPU is the whole machine's busy time, load generator and broker included, and \"kernel work\" the part of it in softirq, hardirq and kworker threads (where the sockmap's redirect worker runs; \"× direct\" or \"× HAProxy\" beside it shows what the path adds). \
         {q}Run took {t:.0} s.\n",
        w = r.workers,
        n = r.plan.reps,
        plural = if r.plan.reps == 1 { "" } else { "s" },
        q = if r.plan.quick { "This was a `--quick` run: sizes are small and figures rough. " } else { "" },
        t = r.total_s,
    );
    // A partial run has no whole picture to check or to hold to targets.
    let whole = r.only.is_none();
    if let Some(only) = &r.only {
        let _ = writeln!(
            s,
            "\nOnly the workloads whose name contains \"{only}\" ran (`--only`)."
        );
    } else {
        s.push_str(&capped(r));
    }
    for (workload, cols) in tables() {
        // Not every phase starts every forwarder, and `--only` runs some
        // workloads only.
        let kinds: Vec<Kind> = ALL.into_iter().filter(|&k| r.ran(workload, k)).collect();
        if kinds.is_empty() {
            continue;
        }
        let _ = writeln!(
            s,
            "\n### {workload}\n\n{}\n",
            describe(workload, &r.plan, r.nofile)
        );
        let mut header = vec!["forwarder".to_string()];
        for c in &cols {
            header.push(c.title.to_string());
            for rf in c.refs {
                header.push(match rf {
                    Haproxy => "× HAProxy".into(),
                    Direct => "× direct".into(),
                    DirectDiff => "− direct".into(),
                });
            }
        }
        let _ = writeln!(s, "| {} |", header.join(" | "));
        let _ = writeln!(s, "|{}", "---|".repeat(header.len()));
        for &kind in &kinds {
            let mut row = vec![kind.name().to_string()];
            for c in &cols {
                let own_cost = c.metric.starts_with("forwarder_") && kind == Kind::Direct;
                let st = r.stat(workload, kind, c.metric).filter(|_| !own_cost);
                row.push(match st {
                    Some(st) if st.n > 1 => {
                        format!("{} ({}–{})", num(st.median), num(st.min), num(st.max))
                    }
                    Some(st) => num(st.median),
                    None => "—".into(),
                });
                for rf in c.refs {
                    let base = match rf {
                        Haproxy => r.haproxy_best(workload, c.metric, c.better),
                        Direct | DirectDiff => r.median(workload, Kind::Direct, c.metric),
                    };
                    row.push(match (st, base) {
                        (Some(st), Some(b)) if *rf == DirectDiff => {
                            if kind == Kind::Direct {
                                "—".into()
                            } else {
                                signed(st.median - b)
                            }
                        }
                        (Some(st), Some(b)) if b != 0.0 => format!("{}×", num(st.median / b)),
                        _ => "—".into(),
                    });
                }
            }
            let _ = writeln!(s, "| {} |", row.join(" | "));
        }
    }
    if whole {
        s.push_str(&targets(r));
    }
    s
}

/// Whether the run could trust its own bulk figures: the load generator's
/// `direct` must come within 25% of iperf3's `direct` in the same run;
/// otherwise something capped it (and likely the forwarders too), and
/// ratios to it mean little.
pub fn capped(r: &Report) -> String {
    let ours = r.median(BULK1, Kind::Direct, "gb_per_s");
    let theirs = r.median(IPERF, Kind::Direct, "gb_per_s");
    match (ours, theirs) {
        (Some(o), Some(t)) if o >= 0.75 * t => format!(
            "\nBulk check: the load generator's direct bulk ({} GB/s) is within 25% of iperf3's ({} GB/s) in this run, so its bulk ratios hold.\n",
            num(o),
            num(t)
        ),
        (Some(o), Some(t)) => format!(
            "\n**This run was capped**: the load generator's direct bulk ({} GB/s) is more than 25% below iperf3's ({} GB/s) on the same machine in the same run; its bulk figures and ratios do not show what the machine can do. Use the iperf3 table.\n",
            num(o),
            num(t)
        ),
        _ => "\nBulk check: no direct figure from both the load generator and iperf3.\n".into(),
    }
}

/// The targets issue 12 sets for splicer as it ships (sockmap offload,
/// `--handoff auto`), measured.
fn targets(r: &Report) -> String {
    let sp = Kind::Splicer;
    let mut s = String::from(
        "\n### Targets (splicer as it ships: sockmap, `--handoff auto`)\n\n| target | measured | |\n|---|---|---|\n",
    );
    let mut line = |what: &str, measured: Option<(String, bool)>| {
        let (text, ok) = measured.unwrap_or(("n/a".into(), false));
        let _ = writeln!(
            s,
            "| {what} | {text} | {} |",
            if ok { "met" } else { "missed" }
        );
    };
    // splicer's figure over a baseline, shown as "1.23×", met when `ok`.
    let over = |w: &str, m: &str, base: Option<f64>, ok: fn(f64) -> bool| {
        let x = r.median(w, sp, m)? / base?;
        Some((format!("{}×", num(x)), ok(x)))
    };
    let hp = |w: &str, m: &str, b: Better| r.haproxy_best(w, m, b);
    let direct = |w: &str, m: &str| r.median(w, Kind::Direct, m);
    for (what, w) in [
        ("bulk, 1 connection ≥ 1.3× HAProxy's best", BULK1),
        ("bulk, 1 connection, iperf3 ≥ 1.3× HAProxy's best", IPERF),
        ("bulk, 4 connections ≥ 1.3× HAProxy's best", BULK4),
    ] {
        line(what, over(w, "gb_per_s", hp(w, "gb_per_s", Higher), |x| x >= 1.3));
    }
    line(
        "bulk, 1 connection ≥ 0.6× direct",
        over(BULK1, "gb_per_s", direct(BULK1, "gb_per_s"), |x| x >= 0.6),
    );
    for (what, w) in [
        ("connections/s ≥ 1.2× HAProxy's best", CONNRATE),
        ("MQTT reconnect storm, sessions/s ≥ 1.2× HAProxy's best", MQTT_STORM),
    ] {
        line(what, over(w, "conns_per_s", hp(w, "conns_per_s", Higher), |x| x >= 1.2));
    }
    for (what, w) in [
        ("MQTT QoS 0 msg/s ≥ 1.1× HAProxy's best", MQTT0),
        ("MQTT QoS 1 msg/s ≥ 1.1× HAProxy's best", MQTT1),
    ] {
        line(what, over(w, "msgs_per_s", hp(w, "msgs_per_s", Higher), |x| x >= 1.1));
    }
    line(
        "MQTT fleet, whole-machine CPU per message ≤ 0.5× HAProxy's",
        over(
            FLEET,
            "system_cpu_us_per_msg",
            hp(FLEET, "system_cpu_us_per_msg", Lower),
            |x| x <= 0.5,
        ),
    );
    line(
        "MQTT fleet, p99 publish to receive ≤ HAProxy's",
        over(FLEET, "p99_us", hp(FLEET, "p99_us", Lower), |x| x <= 1.0),
    );
    line(
        "ping-pong p50 ≤ direct + 10 µs",
        r.median(PINGPONG, sp, "p50_us")
            .zip(direct(PINGPONG, "p50_us"))
            .map(|(a, d)| (format!("direct {} µs", signed(a - d)), a - d <= 10.0)),
    );
    line(
        "idle RSS per connection ≤ 100 B",
        r.median(IDLE, sp, "forwarder_rss_bytes_per_conn")
            .map(|b| (format!("{} B", num(b)), b <= 100.0)),
    );
    s
}

/// Writes bench.md, bench.json (every sample, plus the medians) and
/// bench.svg to `out`; returns the Markdown.
pub fn write(out: &Path, r: &Report) -> Result<String> {
    fs::create_dir_all(out)?;
    let md = markdown(r);
    fs::write(out.join("bench.md"), &md)?;
    let mut summary = Vec::new();
    for (workload, cols) in tables() {
        for kind in ALL {
            for c in &cols {
                if let Some(st) = r.stat(workload, kind, c.metric) {
                    summary.push(json!({"workload": workload, "forwarder": kind.name(), "metric": c.metric, "stat": st}));
                }
            }
        }
    }
    let all = json!({"report": r, "summary": summary});
    fs::write(out.join("bench.json"), serde_json::to_string_pretty(&all)?)?;
    chart::draw(&out.join("bench.svg"), r)?;
    Ok(md)
}
