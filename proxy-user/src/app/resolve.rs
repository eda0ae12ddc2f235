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

pub struct Names {
    resolver: TokioResolver,
    interval: Duration,
    /// The last good answer for each name now configured, and when to ask
    /// again.
    answers: HashMap<Key, Answer>,
}

struct Answer {
    addrs: Vec<SocketAddr>,
    next: Instant,
}

/// A lookup takes at most this; lookups run at once, so the signals (which
/// wait while names are asked) wait at most this long.
const LOOKUP_LIMIT: Duration = Duration::from_secs(5);

/// Host and port: one lookup, whatever weights or listeners name it.
type Key = (String, u16);

impl Names {
    pub fn new(config: &Config) -> Result<Names> {
        let text = std::fs::read(&config.resolv_conf)
            .with_context(|| format!("reading {}", config.resolv_conf.display()))?;
        let (conf, mut opts) = hickory_resolver::system_conf::parse_resolv_conf(text)
            .with_context(|| format!("{}", config.resolv_conf.display()))?;
        // splicer asks again on its own schedule; a cache would answer
        // with what it asked before.
        opts.cache_size = 0;
        // Two tries fit in LOOKUP_LIMIT, whatever resolv.conf says.
        opts.timeout = opts.timeout.min(Duration::from_secs(2));
        opts.attempts = opts.attempts.clamp(1, 2);
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

    /// `config` with every name's addresses among its upstreams. Names with
    /// no answer yet must resolve now (Err names the first that does not);
    /// names whose time has come are asked again, and keep their last good
    /// answer if that fails; names no longer configured are forgotten.
    pub async fn expand(&mut self, config: &Config, metrics: &Metrics) -> Result<Config> {
        let wanted = keys(config);
        self.answers.retain(|k, _| {
            let keep = wanted.contains(k);
            if !keep {
                metrics.forget_dns(&label(k));
            }
            keep
        });
        let now = Instant::now();
        let due: Vec<Key> = wanted
            .into_iter()
            .filter(|k| self.answers.get(k).is_none_or(|a| a.next <= now))
            .collect();
        let mut asked = tokio::task::JoinSet::new();
        for key in due {
            let resolver = self.resolver.clone();
            asked.spawn(async move {
                let found = lookup(&resolver, &key).await;
                (key, found)
            });
        }
        let mut first_failure = None;
        while let Some(done) = asked.join_next().await {
            let (key, found) = done.context("a DNS lookup task")?;
            match found {
                Ok((addrs, ttl)) => {
                    metrics.dns_addresses(&label(&key), addrs.len());
                    // The TTL when sooner than the interval, but not every
                    // moment for a TTL of 0 (a second, or the interval).
                    let floor = Duration::from_secs(1).min(self.interval);
                    let next = Instant::now() + ttl.min(self.interval).max(floor);
                    self.answers.insert(key, Answer { addrs, next });
                }
                Err(e) => match self.answers.get_mut(&key) {
                    Some(last) => {
                        metrics.dns_failed(&label(&key));
                        log::warn!("upstream {}: {e:#}; keeping its last answer", label(&key));
                        last.next = Instant::now() + self.interval;
                    }
                    None => {
                        first_failure.get_or_insert_with(|| anyhow::anyhow!("upstream {}: {e:#}", label(&key)));
                    }
                },
            }
        }
        if let Some(e) = first_failure {
            return Err(e);
        }
        let mut out = config.clone();
        for l in &mut out.listeners {
            for n in &l.names {
                let Some(answer) = self.answers.get(&(n.host.clone(), n.port)) else { continue };
                for a in &answer.addrs {
                    // An address also written as one keeps its own weight.
                    if !l.upstreams.iter().any(|u| u.addr == *a) {
                        l.upstreams.push(Upstream { addr: *a, weight: n.weight });
                    }
                }
            }
        }
        Ok(out)
    }

    /// How long until the first name is due to be asked again.
    pub fn next_due(&self) -> Option<Duration> {
        let now = Instant::now();
        self.answers.values().map(|a| a.next.saturating_duration_since(now)).min()
    }
}

/// A name's addresses (sorted: the balancer's order follows the list, and
/// must not change with the order a server answers in) and their TTL.
async fn lookup(resolver: &TokioResolver, (host, port): &Key) -> Result<(Vec<SocketAddr>, Duration)> {
    let found = tokio::time::timeout(LOOKUP_LIMIT, resolver.lookup_ip(host.as_str()))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {LOOKUP_LIMIT:?}"))??;
    let mut addrs: Vec<SocketAddr> = found.iter().map(|ip| SocketAddr::new(ip, *port)).collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        bail!("no address");
    }
    Ok((addrs, found.valid_until().saturating_duration_since(Instant::now())))
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
