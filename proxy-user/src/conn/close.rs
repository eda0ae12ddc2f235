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
    /// Logs the close line (its words, and the same as fields for
    /// `log-format = "json"`) and counts the end.
    fn close(&self, who: ClientAddrs, said: Option<&Said>, t: &Totals, duration: Duration) {
        self.upstream.metrics.active.dec();
        let fields = CloseFields {
            listener: &self.listener,
            who,
            said,
            upstream: self.upstream.addr,
            totals: t,
            duration,
        };
        log::logger().log(
            &log::Record::builder()
                .level(log::Level::Info)
                .target(module_path!())
                .module_path(Some(module_path!()))
                .key_values(&fields)
                .args(format_args!(
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
                ))
                .build(),
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

/// A close line's fields, by the names `log-format = "json"` gives them
/// (stable: dashboards and log pipelines key on them).
struct CloseFields<'a> {
    listener: &'a str,
    who: ClientAddrs,
    said: Option<&'a Said>,
    upstream: std::net::SocketAddr,
    totals: &'a Totals,
    duration: Duration,
}

impl log::kv::Source for CloseFields<'_> {
    fn visit<'kvs>(&'kvs self, v: &mut dyn log::kv::VisitSource<'kvs>) -> Result<(), log::kv::Error> {
        use log::kv::Value;
        let t = self.totals;
        v.visit_pair("event".into(), Value::from("closed"))?;
        v.visit_pair("listener".into(), Value::from(self.listener))?;
        v.visit_pair("client".into(), Value::from_display(&self.who.real))?;
        if self.who.real != self.who.peer {
            v.visit_pair("via".into(), Value::from_display(&self.who.peer))?;
        }
        v.visit_pair("upstream".into(), Value::from_display(&self.upstream))?;
        v.visit_pair("client_to_upstream".into(), Value::from(t.c2u))?;
        v.visit_pair("upstream_to_client".into(), Value::from(t.u2c))?;
        v.visit_pair("kernel_bytes".into(), Value::from(t.kernel))?;
        v.visit_pair("duration_s".into(), Value::from(self.duration.as_secs_f64()))?;
        v.visit_pair("end".into(), Value::from_display(&t.outcome))?;
        let Some(said) = self.said else { return Ok(()) };
        if let Some(m) = &said.mqtt {
            v.visit_pair("client_id".into(), Value::from(m.client_id.text()))?;
            if let Some(u) = &m.username {
                v.visit_pair("username".into(), Value::from(u.text()))?;
            }
            v.visit_pair("mqtt_version".into(), Value::from_display(&m.version))?;
        }
        if let Some(tls) = &said.tls {
            if let Some(sni) = &tls.sni {
                v.visit_pair("sni".into(), Value::from(sni.as_str()))?;
            }
            if let Some(term) = &tls.terminated {
                v.visit_pair("tls_version".into(), Value::from(term.version))?;
                if let Some(cn) = &term.cn {
                    v.visit_pair("cn".into(), Value::from(cn.text()))?;
                }
            }
        }
        Ok(())
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
