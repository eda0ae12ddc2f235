//! New-connection rate limits on the real client (after PROXY header and
//! X-Forwarded-For resolution), for reconnect storms: a token bucket per
//! source prefix (`rate-limit`, `rate-limit-burst`, `/32` for IPv4 and
//! `/64` for IPv6 by default: one host, one site) and one for the whole
//! listener (`max-connect-rate`). nginx's `limit_conn`/`limit_req` keyed
//! on `$binary_remote_addr`, and HAProxy's `sc_conn_rate` stick tables,
//! do the same job.
//!
//! The per-source table is bounded: when it is full, sources whose bucket
//! has refilled are forgotten (a full bucket is what a new source gets
//! anyway); if it is still full, new sources share one bucket of a single
//! source's size until room is made. An attacker with many addresses costs
//! bounded memory and cannot switch the limit off by filling the table;
//! while it is full, new clients are squeezed (as nginx's `limit_conn`
//! refuses when its zone is exhausted), and clients already tracked are
//! not affected.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use ipnet::IpNet;

use crate::config::{Rate, RateLimit};

/// Sources tracked at most, per listener: about 100 bytes each with the
/// hash table's own overhead, so about 6.5 MB when full.
pub const MAX_SOURCES: usize = 1 << 16;

/// A token bucket: `burst` connections at once, refilled at `per_sec`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: &Rate, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(rate.burst),
            at: now,
        }
    }

    /// Takes a token if there is one.
    fn take(&mut self, rate: &Rate, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * rate.per_sec;
        self.tokens = (self.tokens + refill).min(f64::from(rate.burst));
        // `now` was read before the lock: another caller may have come
        // later, and time must not be credited twice.
        self.at = self.at.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Full again by `now`: forgetting it changes nothing.
    fn refilled(&self, rate: &Rate, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * rate.per_sec;
        self.tokens + refill >= f64::from(rate.burst)
    }
}

/// Which limit a connection ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// Its source's `rate-limit`.
    Source(IpNet),
    /// The listener's `max-connect-rate`.
    Listener,
}

#[derive(Debug)]
pub struct Limits {
    config: RateLimit,
    sources: Mutex<Sources>,
    listener: Mutex<Option<Bucket>>,
}

#[derive(Debug, Default)]
struct Sources {
    buckets: HashMap<IpNet, Bucket>,
    /// When the table was last swept of refilled buckets.
    swept: Option<Instant>,
    /// What new sources share while the table is full.
    overflow: Option<Bucket>,
}

impl Limits {
    pub fn new(config: RateLimit) -> Limits {
        Limits {
            config,
            sources: Mutex::default(),
            listener: Mutex::default(),
        }
    }

    pub fn config(&self) -> &RateLimit {
        &self.config
    }

    /// Whether a new connection from `client` may go on; each limit it
    /// passes is charged a token.
    pub fn admit(&self, client: IpAddr, now: Instant) -> Result<(), Limited> {
        if let Some(rate) = &self.config.per_source {
            let source = self.config.source_of(client);
            if !self.sources.lock().unwrap().take(source, rate, now) {
                return Err(Limited::Source(source));
            }
        }
        if let Some(rate) = &self.config.listener {
            let mut b = self.listener.lock().unwrap();
            if !b.get_or_insert_with(|| Bucket::full(rate, now)).take(rate, now) {
                return Err(Limited::Listener);
            }
        }
        Ok(())
    }

    /// Sources tracked now.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.sources.lock().unwrap().buckets.len()
    }
}

impl Sources {
    fn take(&mut self, source: IpNet, rate: &Rate, now: Instant) -> bool {
        if let Some(b) = self.buckets.get_mut(&source) {
            return b.take(rate, now);
        }
        if self.buckets.len() >= MAX_SOURCES {
            // At most one sweep a second: under a flood of new sources the
            // table is full of live buckets, and sweeping on every accept
            // would cost the whole table each time.
            if self.swept.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
                self.swept = Some(now);
                self.buckets.retain(|_, b| !b.refilled(rate, now));
            }
            if self.buckets.len() >= MAX_SOURCES {
                return self.overflow.get_or_insert_with(|| Bucket::full(rate, now)).take(rate, now);
            }
        }
        let mut b = Bucket::full(rate, now);
        let took = b.take(rate, now);
        self.buckets.insert(source, b);
        took
    }
}

/// One log line per second at most for a listener's rate-limited clients,
/// with a count of those not logged: a storm must not become a log storm.
#[derive(Debug, Default)]
pub struct LogGate {
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogGate {
    /// Some(n) when a line may be logged now; n clients were not logged
    /// since the last line.
    pub fn pass(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap();
        match s.0 {
            Some(t) if now.saturating_duration_since(t) < Duration::from_secs(1) => {
                s.1 += 1;
                None
            }
            _ => {
                s.0 = Some(now);
                Some(std::mem::take(&mut s.1))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_source: Option<(f64, u32)>, listener: Option<(f64, u32)>) -> Limits {
        let rate = |(per_sec, burst)| Rate { per_sec, burst };
        Limits::new(RateLimit {
            per_source: per_source.map(rate),
            listener: listener.map(rate),
            prefix_v4: 32,
            prefix_v6: 64,
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let l = limits(Some((2.0, 3)), None);
        let t = Instant::now();
        let a = ip("192.0.2.1");
        let admitted = (0..10).filter(|_| l.admit(a, t).is_ok()).count();
        assert_eq!(admitted, 3);
        // Half a second at 2/s is one more.
        assert!(l.admit(a, t + Duration::from_millis(500)).is_ok());
        assert!(l.admit(a, t + Duration::from_millis(500)).is_err());
        // Others are not affected.
        assert!(l.admit(ip("192.0.2.2"), t).is_ok());
    }

    #[test]
    fn ipv6_sources_share_their_64() {
        let l = limits(Some((1.0, 1)), None);
        let t = Instant::now();
        assert!(l.admit(ip("2001:db8:1:2::1"), t).is_ok());
        assert_eq!(
            l.admit(ip("2001:db8:1:2:ffff::9"), t),
            Err(Limited::Source("2001:db8:1:2::/64".parse().unwrap()))
        );
        assert!(l.admit(ip("2001:db8:1:3::1"), t).is_ok());
        // An IPv4-mapped client is its IPv4 address.
        assert!(l.admit(ip("::ffff:192.0.2.7"), t).is_ok());
        assert!(l.admit(ip("192.0.2.7"), t).is_err());
    }

    #[test]
    fn the_listener_rate_caps_everyone_together() {
        let l = limits(None, Some((10.0, 5)));
        let t = Instant::now();
        let admitted = (0..20u8).filter(|i| l.admit(IpAddr::from([10, 0, 0, *i]), t).is_ok()).count();
        assert_eq!(admitted, 5);
    }

    #[test]
    fn the_table_is_bounded_and_forgets_refilled_sources() {
        let l = limits(Some((1000.0, 1)), None);
        let t = Instant::now();
        for i in 0..(MAX_SOURCES as u32 + 10) {
            let _ = l.admit(IpAddr::from(i.to_be_bytes()), t);
        }
        assert_eq!(l.tracked(), MAX_SOURCES);
        // Past the cap new sources share one source's bucket (burst 1),
        // which the last ten above emptied; they are not let through.
        assert!(l.admit(ip("203.0.113.1"), t).is_err());
        assert!(l.admit(ip("203.0.113.2"), t).is_err());
        // Once their buckets refill, a sweep forgets them.
        let later = t + Duration::from_secs(2);
        assert!(l.admit(ip("203.0.113.1"), later).is_ok());
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn the_log_gate_passes_one_line_a_second_and_counts_the_rest() {
        let g = LogGate::default();
        let t = Instant::now();
        assert_eq!(g.pass(t), Some(0));
        assert_eq!(g.pass(t + Duration::from_millis(10)), None);
        assert_eq!(g.pass(t + Duration::from_millis(20)), None);
        assert_eq!(g.pass(t + Duration::from_secs(1)), Some(2));
    }
}
