//! Upstreams written as DNS names (`emqx-0.emqx-headless:1883`): resolved
//! at start (a name that does not resolve stops start-up, naming it) and
//! again every `resolve-interval`, or sooner when the answer's TTL says
//! so, with hickory-resolver reading `resolv-conf`. Every address a name
//! returns is an upstream of its own (a Kubernetes headless service gives
//! one per pod). When the addresses change, the listener is reloaded with
//! them: addresses that stay keep their health state and connections,
//! new ones join the balancer, gone ones leave it, live connections are
//! untouched. A failed lookup keeps the last good answer, logged and
//! counted (`splicer_dns_failures_total`).
use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use hickory_resolver::{net::runtime::TokioRuntimeProvider, TokioResolver};

use crate::{
    config::{Config, NamedUpstream, Upstream},
    metrics::Metrics,
};

const LOOKUP_LIMIT: Duration = Duration::from_secs(3);

/// Host and port: one lookup, whatever weights or listeners name it.
type Key = (String, u16);

pub struct Names {
    resolver: TokioResolver,
    interval: Duration,
    /// The last good answer for each name, and until when it holds.
    answers: HashMap<Key, (Vec<SocketAddr>, Instant)>,
}

impl Names {
    pub fn new(config: &Config) -> Result<Names> {
        let text = std::fs::read(&config.resolv_conf)
            .with_context(|| format!("reading {}", config.resolv_conf.display()))?;
        let (conf, mut opts) = hickory_resolver::system_conf::parse_resolv_conf(text)
            .with_context(|| format!("{}", config.resolv_conf.display()))?;
        // splicer asks again on its own schedule; a cache would answer
        // with what it asked before.
        opts.cache_size = 0;
        let resolver = TokioResolver::builder_with_config(conf, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .context("DNS resolver")?;
        Ok(Names {
            resolver,
            interval: config.resolve_interval,
            answers: HashMap::new(),
        })
    }

    /// `config` with every name's addresses among its upstreams. Names it
    /// has no good answer for yet must resolve now (Err names the first
    /// that does not); others keep their last good answer if the lookup
    /// fails.
    pub async fn expand(&mut self, config: &Config, metrics: &Metrics) -> Result<Config> {
        for key in keys(config) {
            match self.lookup(&key).await {
                Ok(answer) => {
                    metrics.dns_addresses(&label(&key), answer.0.len());
                    self.answers.insert(key, answer);
                }
                Err(e) if self.answers.contains_key(&key) => {
                    metrics.dns_failed(&label(&key));
                    log::warn!("upstream {}: {e:#}; keeping its last answer", label(&key));
                }
                Err(e) => bail!("upstream {}: {e:#}", label(&key)),
            }
        }
        let mut out = config.clone();
        for l in &mut out.listeners {
            for n in &l.names {
                let Some((addrs, _)) = self.answers.get(&(n.host.clone(), n.port)) else { continue };
                for a in addrs {
                    // An address also written as one keeps its own weight.
                    if !l.upstreams.iter().any(|u| u.addr == *a) {
                        l.upstreams.push(Upstream { addr: *a, weight: n.weight });
                    }
                }
            }
        }
        Ok(out)
    }

    /// When names should be asked again: the interval, or the earliest
    /// answer's TTL when that comes sooner (at least a second).
    pub fn next_due(&self) -> Option<Duration> {
        if self.answers.is_empty() {
            return None;
        }
        let now = Instant::now();
        let ttl = self.answers.values().map(|(_, until)| until.saturating_duration_since(now)).min();
        Some(ttl.unwrap_or(self.interval).min(self.interval).max(Duration::from_secs(1)))
    }

    async fn lookup(&self, (host, port): &Key) -> Result<(Vec<SocketAddr>, Instant)> {
        // The signals wait while names are asked: a lookup takes at most
        // this (resolv.conf's timeouts and attempts could add up to more).
        let found = tokio::time::timeout(LOOKUP_LIMIT, self.resolver.lookup_ip(host.as_str()))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {LOOKUP_LIMIT:?}"))??;
        let mut addrs: Vec<SocketAddr> = found.iter().map(|ip| SocketAddr::new(ip, *port)).collect();
        // The balancer's order follows the list: keep it stable whatever
        // order the server answers in.
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            bail!("no address");
        }
        Ok((addrs, found.valid_until()))
    }
}

fn keys(config: &Config) -> Vec<Key> {
    let mut keys: Vec<Key> = config
        .listeners
        .iter()
        .flat_map(|l| &l.names)
        .map(|NamedUpstream { host, port, .. }| (host.clone(), *port))
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

fn label((host, port): &Key) -> String {
    format!("{host}:{port}")
}
