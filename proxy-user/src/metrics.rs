//! What splicer counts: Prometheus metric families (served by
//! metrics_server.rs) and the process-wide totals of the `stopping:` line.
//!
//! Each listener gets a `ListenerMetrics` with its label values resolved
//! once, so counting a connection costs no allocation or map lookup.
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, LazyLock, Mutex,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use crate::ebpf_maps::Maps;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: String,
}

/// Why a connection ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CloseReason {
    client_closed,
    upstream_closed,
    client_reset,
    upstream_reset,
    error,
    /// Closed by splicer at the end of a SIGTERM drain.
    drained,
    /// Refused before it reached an upstream (see rejections).
    rejected,
}

/// Why a client was refused before reaching an upstream.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reject {
    /// Missing, malformed, late or truncated PROXY header.
    bad_proxy_header,
    /// A PROXY header from a peer outside trusted-proxy, with untrusted-proxy = reject.
    untrusted_proxy_header,
    /// A WebSocket upgrade request refused (bad, wrong path, too big, too slow).
    bad_websocket_request,
    /// The real client address is not allowed (allow/deny).
    access_denied,
    /// No upstream accepted a connection.
    upstream_down,
    /// The listener already had max-conns clients.
    max_conns,
}

const CLOSE_REASONS: [CloseReason; 7] = [
    CloseReason::client_closed,
    CloseReason::upstream_closed,
    CloseReason::client_reset,
    CloseReason::upstream_reset,
    CloseReason::error,
    CloseReason::drained,
    CloseReason::rejected,
];

const REJECTS: [Reject; 6] = [
    Reject::bad_proxy_header,
    Reject::untrusted_proxy_header,
    Reject::bad_websocket_request,
    Reject::access_denied,
    Reject::upstream_down,
    Reject::max_conns,
];

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    client_to_upstream,
    upstream_to_client,
}

/// Who carried the bytes.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Path {
    kernel,
    userspace,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    listener: String,
    reason: CloseReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    listener: String,
    reason: Reject,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    listener: String,
    direction: Direction,
    path: Path,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OffloadLabels {
    listener: String,
    path: Path,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub listener: String,
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

fn connect_histogram() -> Histogram {
    // 50 µs .. ~3.3 s: loopback connects to refused timeouts.
    Histogram::new(exponential_buckets(0.00005, 3.0, 11))
}

/// Every metric family splicer exports; the names and help texts are what
/// README "Metrics" lists.
pub struct Families {
    accepted: Family<ListenerLabel, Counter>,
    active: Family<ListenerLabel, Gauge>,
    closed: Family<CloseLabels, Counter>,
    rejected: Family<RejectLabels, Counter>,
    untrusted_ignored: Family<ListenerLabel, Counter>,
    bytes: Family<BytesLabels, Counter>,
    offloaded: Family<OffloadLabels, Counter>,
    upstream_up: Family<UpstreamLabels, Gauge>,
    upstream_active: Family<UpstreamLabels, Gauge>,
    upstream_failures: Family<UpstreamLabels, Counter>,
    upstream_connect: Family<UpstreamLabels, Histogram, fn() -> Histogram>,
    offload_mode: Family<ModeLabel, Gauge>,
    reloads: Family<ResultLabel, Counter>,
    registry: Registry,
}

pub static METRICS: LazyLock<Families> = LazyLock::new(Families::new);

impl Families {
    fn new() -> Families {
        let mut f = Families {
            accepted: Default::default(),
            active: Default::default(),
            closed: Default::default(),
            rejected: Default::default(),
            untrusted_ignored: Default::default(),
            bytes: Default::default(),
            offloaded: Default::default(),
            upstream_up: Default::default(),
            upstream_active: Default::default(),
            upstream_failures: Default::default(),
            upstream_connect: Family::new_with_constructor(connect_histogram),
            offload_mode: Default::default(),
            reloads: Default::default(),
            registry: Registry::with_prefix("splicer"),
        };
        let r = &mut f.registry;
        r.register("connections_accepted", "Client connections accepted", f.accepted.clone());
        r.register("connections_active", "Client connections open now", f.active.clone());
        r.register("connections_closed", "Client connections closed, by reason", f.closed.clone());
        r.register("rejections", "Clients refused before reaching an upstream, by reason", f.rejected.clone());
        r.register(
            "proxy_untrusted_ignored",
            "PROXY headers from untrusted peers that were ignored (spoof attempts; the peer's own address was used)",
            f.untrusted_ignored.clone(),
        );
        r.register(
            "bytes",
            "Bytes forwarded, by direction and by who carried them (kernel: the eBPF sockmap; userspace: the relay, PROXY headers and upgrade requests included)",
            f.bytes.clone(),
        );
        r.register(
            "connections_offloaded",
            "Connections by who carries their bytes after setup (kernel: both directions spliced)",
            f.offloaded.clone(),
        );
        r.register("upstream_up", "1 if the upstream takes new clients, 0 if health checks took it down", f.upstream_up.clone());
        r.register("upstream_connections_active", "Client connections open now to this upstream", f.upstream_active.clone());
        r.register(
            "upstream_connect_failures",
            "Failed or timed-out connects to this upstream, for clients and health checks",
            f.upstream_failures.clone(),
        );
        r.register(
            "upstream_connect_seconds",
            "Time to connect to this upstream, for clients",
            f.upstream_connect.clone(),
        );
        r.register("offload_mode", "1 for the offload in effect (sockmap or userspace)", f.offload_mode.clone());
        r.register("config_reloads", "SIGHUP reloads, by result (ok or failed)", f.reloads.clone());
        f
    }

    /// The Prometheus/OpenMetrics text exposition.
    pub fn encode(&self, maps: Option<&Maps>) -> String {
        if let Some(maps) = maps {
            crate::park::sync_kernel_bytes(maps);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn set_offload_mode(&self, mode: &str) {
        self.offload_mode
            .get_or_create(&ModeLabel { mode: mode.into() })
            .set(1);
    }

    pub fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.reloads
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    pub fn upstream(&self, listener: &str, upstream: &str) -> UpstreamMetrics {
        let l = UpstreamLabels {
            listener: listener.into(),
            upstream: upstream.into(),
        };
        UpstreamMetrics {
            up: self.upstream_up.get_or_create_owned(&l),
            active: self.upstream_active.get_or_create_owned(&l),
            failures: self.upstream_failures.get_or_create_owned(&l),
            connect: self.upstream_connect.get_or_create_owned(&l),
        }
    }
}

impl Families {
    /// A reload dropped the upstream: its series go.
    pub fn forget_upstream(&self, listener: &str, upstream: &str) {
        let l = UpstreamLabels {
            listener: listener.into(),
            upstream: upstream.into(),
        };
        self.upstream_up.remove(&l);
        self.upstream_active.remove(&l);
        self.upstream_failures.remove(&l);
        self.upstream_connect.remove(&l);
    }
}

/// One upstream's metric handles.
#[derive(Clone, Debug)]
pub struct UpstreamMetrics {
    pub up: Gauge,
    pub active: Gauge,
    pub failures: Counter,
    pub connect: Histogram,
}

/// One listener's metric handles.
#[derive(Clone, Debug)]
pub struct ListenerMetrics {
    pub accepted: Counter,
    pub active: Gauge,
    closed: [Counter; CLOSE_REASONS.len()],
    rejected: [Counter; REJECTS.len()],
    untrusted_ignored: Counter,
    /// [direction][path]; the kernel ones are published by `kernel`.
    bytes: [[Counter; 2]; 2],
    offloaded: [Counter; 2],
    pub kernel: Arc<KernelBytes>,
}

impl ListenerMetrics {
    pub fn new(listener: &str) -> ListenerMetrics {
        let m = &*METRICS;
        let name = || listener.to_string();
        let l = ListenerLabel { listener: name() };
        let bytes = |direction| {
            [Path::kernel, Path::userspace].map(|path| {
                m.bytes.get_or_create_owned(&BytesLabels {
                    listener: name(),
                    direction,
                    path,
                })
            })
        };
        let bytes = [
            bytes(Direction::client_to_upstream),
            bytes(Direction::upstream_to_client),
        ];
        let kernel = KernelBytes::for_listener(
            listener,
            [bytes[0][Path::kernel as usize].clone(), bytes[1][Path::kernel as usize].clone()],
        );
        ListenerMetrics {
            accepted: m.accepted.get_or_create_owned(&l),
            active: m.active.get_or_create_owned(&l),
            closed: CLOSE_REASONS.map(|reason| {
                m.closed.get_or_create_owned(&CloseLabels {
                    listener: name(),
                    reason,
                })
            }),
            rejected: REJECTS.map(|reason| {
                m.rejected.get_or_create_owned(&RejectLabels {
                    listener: name(),
                    reason,
                })
            }),
            untrusted_ignored: m.untrusted_ignored.get_or_create_owned(&l),
            bytes,
            kernel,
            offloaded: [Path::kernel, Path::userspace].map(|path| {
                m.offloaded.get_or_create_owned(&OffloadLabels {
                    listener: name(),
                    path,
                })
            }),
        }
    }

    pub fn accepted(&self) {
        self.accepted.inc();
        self.active.inc();
        inc(&COUNTERS.accepted);
        inc(&COUNTERS.active);
    }

    pub fn closed(&self, reason: CloseReason) {
        self.closed[reason as usize].inc();
        self.active.dec();
        dec(&COUNTERS.active);
        inc(&COUNTERS.closed);
    }

    pub fn rejected(&self, reason: Reject) {
        self.rejected[reason as usize].inc();
        inc(match reason {
            Reject::bad_proxy_header | Reject::untrusted_proxy_header => &COUNTERS.proxy_rejected,
            Reject::bad_websocket_request => &COUNTERS.ws_refused,
            Reject::access_denied => &COUNTERS.denied,
            Reject::upstream_down => &COUNTERS.upstream_down,
            Reject::max_conns => &COUNTERS.over_max_conns,
        });
    }

    pub fn untrusted_ignored(&self) {
        self.untrusted_ignored.inc();
        inc(&COUNTERS.proxy_untrusted);
    }

    pub fn offloaded(&self, path: Path) {
        self.offloaded[path as usize].inc();
        inc(match path {
            Path::kernel => &COUNTERS.spliced,
            Path::userspace => &COUNTERS.relayed,
        });
    }

    /// The userspace byte counter of a direction (the relay adds to it).
    pub fn user_bytes(&self, direction: Direction) -> &Counter {
        &self.bytes[direction as usize][Path::userspace as usize]
    }
}

/// One listener's kernel-carried bytes. The exported counters are set at
/// each scrape to what closed connections carried plus what parked ones
/// have carried so far (park::sync_kernel_bytes), so they grow while a
/// spliced connection is open; one per listener name, kept across reloads.
#[derive(Debug)]
pub struct KernelBytes {
    closed: [AtomicU64; 2],
    counters: [Counter; 2],
}

static KERNEL: Mutex<Vec<(String, Arc<KernelBytes>)>> = Mutex::new(Vec::new());

impl KernelBytes {
    fn for_listener(name: &str, counters: [Counter; 2]) -> Arc<KernelBytes> {
        let mut all = KERNEL.lock().unwrap();
        if let Some((_, k)) = all.iter().find(|(n, _)| n == name) {
            return k.clone();
        }
        let k = Arc::new(KernelBytes {
            closed: Default::default(),
            counters,
        });
        all.push((name.to_string(), k.clone()));
        k
    }

    /// A connection closed having redirected these (client to upstream,
    /// upstream to client).
    pub fn add_closed(&self, c2u: u64, u2c: u64) {
        self.closed[0].fetch_add(c2u, Ordering::Relaxed);
        self.closed[1].fetch_add(u2c, Ordering::Relaxed);
    }

    /// Brings every listener's counters up to closed + `live(listener)`.
    /// A counter never goes back (a connection busy in a task at this
    /// moment is simply counted at the next scrape).
    pub fn publish_all(live: impl Fn(&KernelBytes) -> [u64; 2]) {
        for (_, k) in KERNEL.lock().unwrap().iter() {
            for (d, live) in live(k).into_iter().enumerate() {
                let total = k.closed[d].load(Ordering::Relaxed) + live;
                k.counters[d].inc_by(total.saturating_sub(k.counters[d].get()));
            }
        }
    }
}

/// Process-wide totals, logged in the `stopping:` line at exit.
#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub closed: AtomicU64,
    pub upstream_down: AtomicU64,
    pub spliced: AtomicU64,
    pub relayed: AtomicU64,
    pub proxy_rejected: AtomicU64,
    pub proxy_untrusted: AtomicU64,
    pub ws_refused: AtomicU64,
    pub denied: AtomicU64,
    pub over_max_conns: AtomicU64,
}

pub static COUNTERS: Counters = Counters {
    accepted: AtomicU64::new(0),
    active: AtomicU64::new(0),
    closed: AtomicU64::new(0),
    upstream_down: AtomicU64::new(0),
    spliced: AtomicU64::new(0),
    relayed: AtomicU64::new(0),
    proxy_rejected: AtomicU64::new(0),
    proxy_untrusted: AtomicU64::new(0),
    ws_refused: AtomicU64::new(0),
    denied: AtomicU64::new(0),
    over_max_conns: AtomicU64::new(0),
};

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn dec(c: &AtomicU64) {
    c.fetch_sub(1, Ordering::Relaxed);
}

impl Counters {
    pub fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "accepted={} active={} closed={} spliced={} relayed={} upstream_down={} \
             proxy_rejected={} proxy_untrusted={} ws_refused={} denied={} over_max_conns={}",
            g(&self.accepted),
            g(&self.active),
            g(&self.closed),
            g(&self.spliced),
            g(&self.relayed),
            g(&self.upstream_down),
            g(&self.proxy_rejected),
            g(&self.proxy_untrusted),
            g(&self.ws_refused),
            g(&self.denied),
            g(&self.over_max_conns),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_counts_appear_in_the_exposition() {
        let m = ListenerMetrics::new("unit");
        m.accepted();
        m.rejected(Reject::access_denied);
        m.rejected(Reject::access_denied);
        m.closed(CloseReason::rejected);
        m.user_bytes(Direction::client_to_upstream).inc_by(42);
        m.kernel.add_closed(7, 0);
        KernelBytes::publish_all(|_| [0, 0]);
        let text = METRICS.encode(None);
        for line in [
            r#"splicer_connections_accepted_total{listener="unit"} 1"#,
            r#"splicer_connections_active{listener="unit"} 0"#,
            r#"splicer_rejections_total{listener="unit",reason="access_denied"} 2"#,
            r#"splicer_rejections_total{listener="unit",reason="max_conns"} 0"#,
            r#"splicer_connections_closed_total{listener="unit",reason="rejected"} 1"#,
            r#"splicer_bytes_total{listener="unit",direction="client_to_upstream",path="userspace"} 42"#,
            r#"splicer_bytes_total{listener="unit",direction="client_to_upstream",path="kernel"} 7"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in:\n{text}");
        }
    }
}
