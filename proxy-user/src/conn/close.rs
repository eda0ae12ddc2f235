//! The end of a connection that reached an upstream: one close line and
//! its counts. A `Route` (a listener and one of its upstreams) is the
//! datapath's `Owner` for every connection between them, so a connection
//! parked in the kernel reports here when it ends without holding
//! anything of its own. An MQTT or TLS passthrough connection holds one
//! thing of its own, what its first packet said (`Named`), for its close
//! line.
use std::{fmt, sync::Arc, time::Duration};

use crate::{
    datapath::carried::{ClientAddrs, Outcome, Owner, Totals},
    ingress::{mqtt::Session, tls::TlsSession},
    metrics::{CloseReason, ListenerMetrics},
    upstream::health::UpstreamState,
};

pub struct Route {
    listener: String,
    metrics: ListenerMetrics,
    upstream: Arc<UpstreamState>,
}

impl Route {
    pub fn new(listener: &str, metrics: &ListenerMetrics, upstream: Arc<UpstreamState>) -> Route {
        Route {
            listener: listener.to_string(),
            metrics: metrics.clone(),
            upstream,
        }
    }

    pub fn leads_to(&self, upstream: &Arc<UpstreamState>) -> bool {
        Arc::ptr_eq(&self.upstream, upstream)
    }
}

impl Owner for Route {
    fn metrics(&self) -> &ListenerMetrics {
        &self.metrics
    }

    fn closed(&self, who: ClientAddrs, t: &Totals, duration: Duration) {
        self.close(who, None, t, duration);
    }
}

/// What a client's first packets said, as its log lines show it: its
/// TLS (passed through, or terminated here) and its MQTT CONNECT.
#[derive(Debug, Clone, Default)]
pub struct Said {
    pub tls: Option<TlsSession>,
    pub mqtt: Option<Session>,
}

impl Said {
    pub fn is_empty(&self) -> bool {
        self.tls.is_none() && self.mqtt.is_none()
    }
}

impl fmt::Display for Said {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.tls, &self.mqtt) {
            (Some(t), Some(m)) => write!(f, "{t} {m}"),
            (Some(t), None) => t.fmt(f),
            (None, Some(m)) => m.fmt(f),
            (None, None) => Ok(()),
        }
    }
}

impl Route {
    /// Logs the close line and counts the end.
    fn close(&self, who: ClientAddrs, said: Option<&Said>, t: &Totals, duration: Duration) {
        self.upstream.metrics.active.dec();
        log::info!(
            "[{}] closed {} upstream={} client_to_upstream={} upstream_to_client={} \
             kernel_bytes={} duration={:.3}s end={}",
            self.listener,
            named(who, said),
            self.upstream.addr,
            t.c2u,
            t.u2c,
            t.kernel,
            duration.as_secs_f64(),
            t.outcome
        );
        self.metrics.closed(match t.outcome {
            Outcome::ClientClosed => CloseReason::client_closed,
            Outcome::UpstreamClosed => CloseReason::upstream_closed,
            Outcome::ClientReset => CloseReason::client_reset,
            Outcome::UpstreamReset => CloseReason::upstream_reset,
            Outcome::Drained => CloseReason::drained,
            Outcome::Error => CloseReason::error,
        });
    }
}

/// The owner of one MQTT or TLS passthrough connection: its route, and
/// what its first packet said.
pub struct Named {
    pub route: Arc<Route>,
    pub said: Said,
}

impl Owner for Named {
    fn metrics(&self) -> &ListenerMetrics {
        &self.route.metrics
    }

    fn closed(&self, who: ClientAddrs, t: &Totals, duration: Duration) {
        self.route.close(who, Some(&self.said), t, duration);
    }
}

/// Which client this is, and what its first packets said once they were
/// read: `client=… [via=…] [sni=… [tls_version=… cn=…]] [client_id=…
/// username=… mqtt_version=…]`.
pub fn named(a: ClientAddrs, said: Option<&Said>) -> impl fmt::Display + '_ {
    fmt::from_fn(move |f| match said.filter(|s| !s.is_empty()) {
        Some(s) => write!(f, "{} {s}", who(a)),
        None => write!(f, "{}", who(a)),
    })
}

/// Which client this is, for logs: `client=` the real one, and `via=` the
/// TCP peer when that is another (a trusted proxy).
pub fn who(a: ClientAddrs) -> impl fmt::Display {
    fmt::from_fn(move |f| match a.real == a.peer {
        true => write!(f, "client={}", a.peer),
        false => write!(f, "client={} via={}", a.real, a.peer),
    })
}
