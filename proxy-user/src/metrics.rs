//! Process-wide counters. Issue #6 exports them in Prometheus format; for now
//! they are logged at shutdown and used by the close log line.
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub closed: AtomicU64,
    /// Clients closed because no upstream accepted a connection.
    pub upstream_down: AtomicU64,
    /// Single upstream connect attempts that failed or timed out.
    pub upstream_connect_failed: AtomicU64,
    /// Connections carried by the kernel in both directions.
    pub spliced: AtomicU64,
    /// Connections (or one direction of one) relayed in userspace.
    pub relayed: AtomicU64,
    /// Connections refused for a missing, bad, late or untrusted PROXY header.
    pub proxy_rejected: AtomicU64,
    /// PROXY headers from untrusted peers that were ignored (spoof attempts).
    pub proxy_untrusted: AtomicU64,
    /// WebSocket upgrade requests refused (bad, wrong path, too big, too slow).
    pub ws_refused: AtomicU64,
}

pub static COUNTERS: Counters = Counters {
    accepted: AtomicU64::new(0),
    active: AtomicU64::new(0),
    closed: AtomicU64::new(0),
    upstream_down: AtomicU64::new(0),
    upstream_connect_failed: AtomicU64::new(0),
    spliced: AtomicU64::new(0),
    relayed: AtomicU64::new(0),
    proxy_rejected: AtomicU64::new(0),
    proxy_untrusted: AtomicU64::new(0),
    ws_refused: AtomicU64::new(0),
};

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub fn dec(c: &AtomicU64) {
    c.fetch_sub(1, Ordering::Relaxed);
}

impl Counters {
    pub fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "accepted={} active={} closed={} spliced={} relayed={} upstream_down={} upstream_connect_failed={} \
             proxy_rejected={} proxy_untrusted={} ws_refused={}",
            g(&self.accepted), g(&self.active), g(&self.closed), g(&self.spliced), g(&self.relayed),
            g(&self.upstream_down), g(&self.upstream_connect_failed), g(&self.proxy_rejected), g(&self.proxy_untrusted), g(&self.ws_refused)
        )
    }
}
