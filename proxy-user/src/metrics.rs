//! What splicer counts: Prometheus metric families (served by
//! app/metrics_endpoint.rs) and the process-wide totals of the `stopping:`
//! line. One `Metrics` value, made in main and passed down.
//!
//! Each listener gets a `ListenerMetrics` with its label values resolved
//! once, so counting a connection costs no allocation or map lookup.
use std::{
    collections::HashMap,
    sync::{
    atomic::{AtomicU64, Ordering},
    Arc, Mutex,
    },
};

use splicer_proto::mqtt::Version;

use crate::tls::certs::CertFacts;
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::{Metric, Registry},
};

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
    /// The listener already had max-handshakes clients in their handshake.
    max_handshakes,
    /// The broker answered a WebSocket upgrade with something other than
    /// 101 (its answer was passed to the client), or not at all.
    upstream_refused_upgrade,
    /// An MQTT listener's client sent no valid CONNECT first (see
    /// splicer_mqtt_connect_rejections for why).
    bad_mqtt_connect,
    /// Over rate-limit (its source's) or max-connect-rate (the listener's).
    rate_limited,
    /// A tls-passthrough client sent no valid ClientHello first.
    bad_tls_hello,
    /// A tls-passthrough client asked for a server name no `sni` group takes.
    unknown_sni,
    /// A client of a terminating listener did not complete its TLS
    /// handshake (see splicer_tls_handshake_failures for why).
    bad_tls_handshake,
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

const REJECTS: [Reject; 13] = [
    Reject::bad_proxy_header,
    Reject::untrusted_proxy_header,
    Reject::bad_websocket_request,
    Reject::access_denied,
    Reject::upstream_down,
    Reject::max_conns,
    Reject::max_handshakes,
    Reject::upstream_refused_upgrade,
    Reject::bad_mqtt_connect,
    Reject::rate_limited,
    Reject::bad_tls_hello,
    Reject::unknown_sni,
    Reject::bad_tls_handshake,
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

/// A certificate a terminating listener serves: its file and its names.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    listener: String,
    file: String,
    names: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    listener: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    listener: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

/// An upstream written as a DNS name, `host:port`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NameLabel {
    name: String,
}

/// A new family, registered under `name` (the prefix `splicer_` added).
fn family<M: Metric + Clone + Default>(r: &mut Registry, name: &str, help: &str) -> M {
    registered(r, name, help, M::default())
}

fn registered<M: Metric + Clone>(r: &mut Registry, name: &str, help: &str, metric: M) -> M {
    r.register(name, help, metric.clone());
    metric
}

fn connect_histogram() -> Histogram {
    // 50 µs .. ~3.3 s: loopback connects to refused timeouts.
    Histogram::new(exponential_buckets(0.00005, 3.0, 11))
}

/// Every metric family splicer exports (the names and help texts are what
/// README "Metrics" lists), and the totals of the `stopping:` line.
pub struct Metrics {
    accepted: Family<ListenerLabel, Counter>,
    active: Family<ListenerLabel, Gauge>,
    closed: Family<CloseLabels, Counter>,
    rejected: Family<RejectLabels, Counter>,
    untrusted_ignored: Family<ListenerLabel, Counter>,
    bytes: Family<BytesLabels, Counter>,
    offloaded: Family<OffloadLabels, Counter>,
    handoff_refused: Family<ListenerLabel, Counter>,
    upstream_up: Family<UpstreamLabels, Gauge>,
    upstream_active: Family<UpstreamLabels, Gauge>,
    upstream_failures: Family<UpstreamLabels, Counter>,
    upstream_connect: Family<UpstreamLabels, Histogram, fn() -> Histogram>,
    offload_mode: Family<ModeLabel, Gauge>,
    reloads: Family<ResultLabel, Counter>,
    mqtt_connections: Family<VersionLabels, Counter>,
    mqtt_rejections: Family<ReasonLabels, Counter>,
    tls_rejections: Family<ReasonLabels, Counter>,
    tls_handshake_failures: Family<ReasonLabels, Counter>,
    tls_cert_not_after: Family<CertLabels, Gauge>,
    dns_failures: Family<NameLabel, Counter>,
    dns_addresses: Family<NameLabel, Gauge>,
    buffer_cap: Gauge,
    buffer_granted: Gauge,
    buffer_refused: Counter,
    registry: Registry,
    totals: Arc<Counters>,
    /// Each listener's kernel byte counts, by name, kept across reloads.
    kernel: Mutex<Vec<(String, Arc<KernelBytes>)>>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("splicer");
        let connect = Family::new_with_constructor(connect_histogram as fn() -> Histogram);
        let m = Metrics {
            accepted: family(&mut r, "connections_accepted", "Client connections accepted"),
            active: family(&mut r, "connections_active", "Client connections open now"),
            closed: family(&mut r, "connections_closed", "Client connections closed, by reason"),
            rejected: family(&mut r, "rejections", "Clients refused before reaching an upstream, by reason"),
            untrusted_ignored: family(&mut r, "proxy_untrusted_ignored", "PROXY headers from untrusted peers that were ignored (spoof attempts; the peer's own address was used)"),
            bytes: family(&mut r, "bytes", "Bytes forwarded, by direction and by who carried them (kernel: the eBPF sockmap; userspace: the relay, PROXY headers and upgrade requests included)"),
            offloaded: family(&mut r, "connections_offloaded", "Connections by who carries their bytes after setup (kernel: both directions spliced)"),
            handoff_refused: family(&mut r, "kernel_handoffs_refused", "Connections the kernel could not take (an eBPF map full, a socket gone before the handoff), relayed in userspace instead"),
            upstream_up: family(&mut r, "upstream_up", "1 if the upstream takes new clients, 0 if health checks took it down"),
            upstream_active: family(&mut r, "upstream_connections_active", "Client connections open now to this upstream"),
            upstream_failures: family(&mut r, "upstream_connect_failures", "Failed or timed-out connects to this upstream, for clients and health checks"),
            upstream_connect: registered(&mut r, "upstream_connect_seconds", "Time to connect to this upstream, for clients", connect),
            offload_mode: family(&mut r, "offload_mode", "1 for the offload in effect (sockmap or userspace)"),
            reloads: family(&mut r, "config_reloads", "SIGHUP reloads, by result (ok or failed)"),
            dns_failures: family(&mut r, "dns_failures", "Failed re-resolutions of an upstream name (the last good answer is kept)"),
            dns_addresses: family(&mut r, "dns_addresses", "Addresses an upstream name resolves to now (each one an upstream)"),
            mqtt_connections: family(&mut r, "mqtt_connections", "MQTT listeners: clients whose CONNECT was read, by protocol version"),
            mqtt_rejections: family(&mut r, "mqtt_connect_rejections", "MQTT listeners: clients refused for their first packet, by reason (not_connect, malformed, protocol_error, identifier_rejected, unsupported_version, too_large, timeout, closed)"),
            tls_rejections: family(&mut r, "tls_hello_rejections", "TLS passthrough listeners: clients refused for their ClientHello, by reason (not_tls, malformed, too_large, timeout, closed)"),
            tls_cert_not_after: family(&mut r, "tls_cert_not_after_seconds", "TLS-terminating listeners: when each served certificate expires (notAfter, Unix seconds)"),
            tls_handshake_failures: family(&mut r, "tls_handshake_failures", "TLS-terminating listeners: handshakes that did not complete, by reason (timeout, closed, no_client_cert, bad_client_cert, incompatible, no_alpn, client_alert, malformed)"),
            buffer_cap: registered(&mut r, "kernel_buffer_cap_bytes", "--max-buffered: what kernel-carried directions may hold in kernel queues beyond their floors, together", Gauge::default()),
            buffer_granted: registered(&mut r, "kernel_buffer_granted_bytes", "What the grants of kernel-carried directions beyond their floors allow them to hold now, together", Gauge::default()),
            buffer_refused: registered(&mut r, "kernel_buffer_grants_refused", "Times a fast kernel-carried direction could not get a bigger grant because --max-buffered was reached", Counter::default()),
            registry: r,
            totals: Arc::default(),
            kernel: Mutex::default(),
        };
        // From 0, so that an alert on increase() sees the first failure.
        for result in ["ok", "failed"] {
            let _ = m.reloads.get_or_create(&ResultLabel { result: result.into() });
        }
        m
    }

    /// Brings each listener's kernel byte counters up to what its closed
    /// connections carried plus what its open ones have carried so far
    /// (`live`), so they grow while a spliced connection is open. The caller
    /// holds `live` steady meanwhile (no connection moving from live to
    /// closed), or a byte could count twice. A counter never goes back (a
    /// connection relayed half in userspace is counted when it closes).
    pub fn publish_kernel_bytes(&self, live: &LiveBytes) {
        for (_, k) in self.kernel.lock().unwrap().iter() {
            let live = live.0.get(&Arc::as_ptr(k)).copied().unwrap_or_default();
            for (d, live) in live.into_iter().enumerate() {
                let total = k.closed[d].load(Ordering::Relaxed) + live;
                k.counters[d].inc_by(total.saturating_sub(k.counters[d].get()));
            }
        }
    }

    /// The kernel buffer budget (see datapath/kernel/budget.rs), at a scrape.
    pub fn publish_buffer_budget(&self, cap: u64, granted: u64, refused: u64) {
        self.buffer_cap.set(i64::try_from(cap).unwrap_or(i64::MAX));
        self.buffer_granted.set(i64::try_from(granted).unwrap_or(i64::MAX));
        self.buffer_refused.inc_by(refused.saturating_sub(self.buffer_refused.get()));
    }

    /// The Prometheus/OpenMetrics text exposition.
    pub fn encode(&self) -> String {
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

    pub fn dns_failed(&self, name: &str) {
        self.dns_failures.get_or_create(&NameLabel { name: name.into() }).inc();
    }

    /// A name no longer configured: its series go.
    pub fn forget_dns(&self, name: &str) {
        let l = NameLabel { name: name.into() };
        self.dns_addresses.remove(&l);
        self.dns_failures.remove(&l);
    }

    pub fn dns_addresses(&self, name: &str, n: usize) {
        let l = NameLabel { name: name.into() };
        self.dns_addresses.get_or_create(&l).set(n as i64);
        // From 0, so that an alert on increase() sees the first failure.
        let _ = self.dns_failures.get_or_create(&l);
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

impl Metrics {
    /// An MQTT listener's handles, its series created at zero. `reasons`
    /// are the rejection labels it can count.
    pub fn mqtt(&self, listener: &str, reasons: &[&'static str]) -> MqttMetrics {
        let versions = [Version::V3_1, Version::V3_1_1, Version::V5].map(|v| {
            self.mqtt_connections.get_or_create_owned(&VersionLabels {
                listener: listener.into(),
                version: v.to_string(),
            })
        });
        MqttMetrics {
            versions,
            rejections: ByReason::new(&self.mqtt_rejections, listener, reasons),
        }
    }

    /// A TLS passthrough listener's ClientHello rejections, by `reasons`,
    /// created at zero.
    pub fn tls_hello(&self, listener: &str, reasons: &[&'static str]) -> ByReason {
        ByReason::new(&self.tls_rejections, listener, reasons)
    }

    pub fn tls_handshake(&self, listener: &str, reasons: &[&'static str]) -> ByReason {
        ByReason::new(&self.tls_handshake_failures, listener, reasons)
    }

    /// Shows a served certificate's expiry; `None` takes it away (a reload
    /// that no longer serves it, or no longer has the listener).
    pub fn tls_cert(&self, listener: &str, cert: &CertFacts, not_after: Option<i64>) {
        let l = CertLabels {
            listener: listener.into(),
            file: cert.file.display().to_string(),
            names: cert.names.join(","),
        };
        match not_after {
            Some(t) => {
                self.tls_cert_not_after.get_or_create(&l).set(t);
            }
            None => {
                self.tls_cert_not_after.remove(&l);
            }
        }
    }

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

/// An MQTT listener's metric handles.
#[derive(Clone, Debug)]
pub struct MqttMetrics {
    /// By Version, in declaration order.
    versions: [Counter; 3],
    rejections: ByReason,
}

impl MqttMetrics {
    pub fn connected(&self, v: Version) {
        self.versions[v as usize].inc();
    }

    pub fn refused(&self, reason: &str) {
        self.rejections.inc(reason);
    }
}

/// One listener's counters of a family labelled by `reason`.
#[derive(Clone, Debug)]
pub struct ByReason(Vec<(&'static str, Counter)>);

impl ByReason {
    fn new(family: &Family<ReasonLabels, Counter>, listener: &str, reasons: &[&'static str]) -> ByReason {
        ByReason(
            reasons
                .iter()
                .map(|r| {
                    let labels = ReasonLabels {
                        listener: listener.into(),
                        reason: (*r).into(),
                    };
                    (*r, family.get_or_create_owned(&labels))
                })
                .collect(),
        )
    }

    pub fn inc(&self, reason: &str) {
        if let Some((_, c)) = self.0.iter().find(|(r, _)| *r == reason) {
            c.inc();
        }
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
    /// The kernel could not take a connection; it was relayed.
    pub handoff_refused: Counter,
    pub kernel: Arc<KernelBytes>,
    totals: Arc<Counters>,
}

impl Metrics {
    /// The process-wide totals (the `stopping:` line, the drain's count).
    pub fn totals(&self) -> &Counters {
        &self.totals
    }

    /// A listener's handles, its series created at zero.
    pub fn listener(&self, listener: &str) -> ListenerMetrics {
        let m = self;
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
        let kernel = self.kernel_bytes(
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
            handoff_refused: m.handoff_refused.get_or_create_owned(&l),
            totals: self.totals.clone(),
        }
    }

    fn kernel_bytes(&self, name: &str, counters: [Counter; 2]) -> Arc<KernelBytes> {
        let mut all = self.kernel.lock().unwrap();
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
}

impl ListenerMetrics {
    pub fn accepted(&self) {
        self.accepted.inc();
        self.active.inc();
        inc(&self.totals.accepted);
        inc(&self.totals.active);
    }

    pub fn closed(&self, reason: CloseReason) {
        self.closed[reason as usize].inc();
        self.active.dec();
        dec(&self.totals.active);
        inc(&self.totals.closed);
    }

    pub fn rejected(&self, reason: Reject) {
        self.rejected[reason as usize].inc();
        inc(match reason {
            Reject::bad_proxy_header | Reject::untrusted_proxy_header => &self.totals.proxy_rejected,
            Reject::bad_websocket_request | Reject::upstream_refused_upgrade => &self.totals.ws_refused,
            Reject::bad_mqtt_connect => &self.totals.mqtt_refused,
            Reject::rate_limited => &self.totals.rate_limited,
            Reject::bad_tls_hello | Reject::unknown_sni | Reject::bad_tls_handshake => &self.totals.tls_refused,
            Reject::access_denied => &self.totals.denied,
            Reject::upstream_down => &self.totals.upstream_down,
            Reject::max_conns | Reject::max_handshakes => &self.totals.over_max_conns,
        });
    }

    pub fn untrusted_ignored(&self) {
        self.untrusted_ignored.inc();
        inc(&self.totals.proxy_untrusted);
    }

    pub fn offloaded(&self, path: Path) {
        self.offloaded[path as usize].inc();
        inc(match path {
            Path::kernel => &self.totals.spliced,
            Path::userspace => &self.totals.relayed,
        });
    }

    /// The userspace byte counter of a direction (the relay adds to it).
    pub fn user_bytes(&self, direction: Direction) -> &Counter {
        &self.bytes[direction as usize][Path::userspace as usize]
    }
}

/// One listener's kernel-carried bytes. The exported counters are set at
/// each scrape to what closed connections carried plus what open ones have
/// carried so far (see `Metrics::encode`); one per listener name, kept
/// across reloads.
#[derive(Debug)]
pub struct KernelBytes {
    closed: [AtomicU64; 2],
    counters: [Counter; 2],
}

impl KernelBytes {
    /// A connection closed having redirected these (client to upstream,
    /// upstream to client).
    pub fn add_closed(&self, c2u: u64, u2c: u64) {
        self.closed[0].fetch_add(c2u, Ordering::Relaxed);
        self.closed[1].fetch_add(u2c, Ordering::Relaxed);
    }
}

/// Kernel bytes carried so far by open connections, per listener (client
/// to upstream, upstream to client).
#[derive(Default)]
pub struct LiveBytes(HashMap<*const KernelBytes, [u64; 2]>);

impl LiveBytes {
    pub fn add(&mut self, listener: &Arc<KernelBytes>, bytes: [u64; 2]) {
        let e = self.0.entry(Arc::as_ptr(listener)).or_default();
        e[0] += bytes[0];
        e[1] += bytes[1];
    }
}

/// Process-wide totals, logged in the `stopping:` line at exit.
#[derive(Debug, Default)]
pub struct Counters {
    accepted: AtomicU64,
    active: AtomicU64,
    closed: AtomicU64,
    upstream_down: AtomicU64,
    spliced: AtomicU64,
    relayed: AtomicU64,
    proxy_rejected: AtomicU64,
    proxy_untrusted: AtomicU64,
    ws_refused: AtomicU64,
    mqtt_refused: AtomicU64,
    rate_limited: AtomicU64,
    tls_refused: AtomicU64,
    denied: AtomicU64,
    over_max_conns: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn dec(c: &AtomicU64) {
    c.fetch_sub(1, Ordering::Relaxed);
}

impl Counters {
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections the kernel took over (at once, or after `--handoff
    /// auto`'s userspace phase).
    pub fn spliced(&self) -> u64 {
        self.spliced.load(Ordering::Relaxed)
    }

    /// Client connections open now, on every listener.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "accepted={} active={} closed={} spliced={} relayed={} upstream_down={} \
             proxy_rejected={} proxy_untrusted={} ws_refused={} mqtt_refused={} rate_limited={} tls_refused={} denied={} over_max_conns={}",
            g(&self.accepted),
            g(&self.active),
            g(&self.closed),
            g(&self.spliced),
            g(&self.relayed),
            g(&self.upstream_down),
            g(&self.proxy_rejected),
            g(&self.proxy_untrusted),
            g(&self.ws_refused),
            g(&self.mqtt_refused),
            g(&self.rate_limited),
            g(&self.tls_refused),
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
        let metrics = Metrics::new();
        let m = metrics.listener("unit");
        m.accepted();
        m.rejected(Reject::access_denied);
        m.rejected(Reject::access_denied);
        m.closed(CloseReason::rejected);
        m.user_bytes(Direction::client_to_upstream).inc_by(42);
        m.kernel.add_closed(7, 0);
        metrics.publish_kernel_bytes(&LiveBytes::default());
        let text = metrics.encode();
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
