//! Access control on the real client address (after PROXY header and
//! X-Forwarded-For resolution): `deny` wins, then a non-empty `allow` must
//! match. Like nginx's allow/deny, but order-free.
use std::net::IpAddr;

use ipnet::IpNet;

use splicer_proto::trust::Trusted;

#[derive(Debug, Clone, Default)]
pub struct Access {
    allow: Option<Trusted>,
    deny: Trusted,
}

impl Access {
    pub fn new(allow: &[IpNet], deny: &[IpNet]) -> Self {
        Access {
            allow: (!allow.is_empty()).then(|| Trusted::new(allow)),
            deny: Trusted::new(deny),
        }
    }

    pub fn permits(&self, client: IpAddr) -> bool {
        !self.deny.contains(client) && self.allow.as_ref().is_none_or(|a| a.contains(client))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(allow: &[&str], deny: &[&str]) -> Access {
        let nets = |v: &[&str]| v.iter().map(|s| s.parse().unwrap()).collect::<Vec<IpNet>>();
        Access::new(&nets(allow), &nets(deny))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn empty_lists_permit_everyone() {
        assert!(access(&[], &[]).permits(ip("203.0.113.9")));
    }

    #[test]
    fn deny_wins_over_allow() {
        let a = access(&["10.0.0.0/8"], &["10.1.0.0/16"]);
        assert!(a.permits(ip("10.2.3.4")));
        assert!(!a.permits(ip("10.1.3.4")));
        assert!(!a.permits(ip("192.0.2.1")));
    }

    #[test]
    fn ipv4_mapped_clients_match_ipv4_rules() {
        let a = access(&[], &["192.0.2.0/24"]);
        assert!(!a.permits(ip("::ffff:192.0.2.7")));
        assert!(a.permits(ip("2001:db8::1")));
    }
}
