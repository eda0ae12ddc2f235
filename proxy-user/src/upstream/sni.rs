//! Which upstream group a TLS server name goes to (`tls-passthrough`):
//! the exact name, else the longest `*.suffix` it ends with, else `*`,
//! else nowhere. Each group balances its own upstreams with the
//! listener's policy. nginx's `ssl_preread` with a `map $ssl_preread_server_name`
//! and HAProxy's `use_backend ... if { req.ssl_sni -m end ... }` do the same.
use std::{collections::HashMap, sync::Arc};

use super::{balance::Balancer, health::UpstreamState};
use crate::config::{Balance, SniMatch, Upstream};

#[derive(Debug)]
pub struct SniRouter {
    exact: HashMap<String, Balancer>,
    /// Longest suffix first.
    suffixes: Vec<(String, Balancer)>,
    any: Option<Balancer>,
}

impl SniRouter {
    /// `state` finds the shared state of an upstream of the listener.
    pub fn new(
        kind: Balance,
        groups: &[(SniMatch, Vec<Upstream>)],
        state: impl Fn(&Upstream) -> Arc<UpstreamState>,
    ) -> SniRouter {
        let mut r = SniRouter {
            exact: HashMap::new(),
            suffixes: Vec::new(),
            any: None,
        };
        for (name, ups) in groups {
            let b = Balancer::new(kind, ups.iter().map(|u| (state(u), u.weight)).collect());
            match name {
                SniMatch::Exact(n) => {
                    r.exact.insert(n.clone(), b);
                }
                SniMatch::Suffix(s) => r.suffixes.push((s.clone(), b)),
                SniMatch::Any => r.any = Some(b),
            }
        }
        r.suffixes.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        r
    }

    /// The group for `sni` (None: the client sent no name), if any.
    pub fn group(&self, sni: Option<&str>) -> Option<&Balancer> {
        let by_name = sni.and_then(|n| {
            self.exact
                .get(n)
                .or_else(|| self.suffixes.iter().find(|(s, _)| n.ends_with(s.as_str())).map(|(_, b)| b))
        });
        by_name.or(self.any.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(groups: &[(&str, &str)]) -> SniRouter {
        let groups: Vec<(SniMatch, Vec<Upstream>)> =
            groups.iter().map(|(n, a)| (n.parse().unwrap(), vec![a.parse().unwrap()])).collect();
        SniRouter::new(Balance::RoundRobin, &groups, |u| {
            let m = crate::metrics::Metrics::new().upstream("sni-unit", &u.addr.to_string());
            Arc::new(UpstreamState::new("sni-unit", u.addr, m))
        })
    }

    fn port(r: &SniRouter, sni: Option<&str>) -> Option<u16> {
        Some(r.group(sni)?.candidates([127, 0, 0, 1].into(), None)[0].addr.port())
    }

    #[test]
    fn exact_then_longest_suffix_then_any() {
        let r = router(&[
            ("*.example.com", "127.0.0.1:1"),
            ("*.eu.example.com", "127.0.0.1:2"),
            ("broker.eu.example.com", "127.0.0.1:3"),
            ("*", "127.0.0.1:4"),
        ]);
        assert_eq!(port(&r, Some("broker.eu.example.com")), Some(3));
        assert_eq!(port(&r, Some("x.eu.example.com")), Some(2));
        assert_eq!(port(&r, Some("a.b.example.com")), Some(1));
        assert_eq!(port(&r, Some("example.com")), Some(4), "*.example.com does not take example.com");
        assert_eq!(port(&r, Some("other.org")), Some(4));
        assert_eq!(port(&r, None), Some(4));
    }

    #[test]
    fn without_any_an_unknown_name_goes_nowhere() {
        let r = router(&[("a.example", "127.0.0.1:1")]);
        assert_eq!(port(&r, Some("a.example")), Some(1));
        assert_eq!(port(&r, Some("b.example")), None);
        assert_eq!(port(&r, None), None);
    }
}
