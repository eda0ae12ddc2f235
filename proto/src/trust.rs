//! Whose word counts: the trusted-proxy CIDRs (nginx `set_real_ip_from`).
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

#[derive(Debug, Clone, Default)]
pub struct Trusted {
    nets: Vec<IpNet>,
}

impl Trusted {
    pub fn new(nets: &[IpNet]) -> Self {
        Trusted {
            nets: nets.iter().map(|n| canonical_net(*n)).collect(),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|n| n.contains(&ip))
    }
}

/// A dual-stack listener reports IPv4 peers as `::ffff:a.b.c.d`; trust and
/// logs treat them as the IPv4 address they are. Getting this wrong is a
/// known way to trust everyone, or no one.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// `::ffff:10.0.0.0/104` is the IPv4 net 10.0.0.0/8.
fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if let (Some(v4), true) = (v6.addr().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            if let Ok(n) = Ipv4Net::new(v4, v6.prefix_len() - 96) {
                return IpNet::V4(n.trunc());
            }
        }
    }
    net.trunc()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(nets: &[&str]) -> Trusted {
        Trusted::new(&nets.iter().map(|n| n.parse().unwrap()).collect::<Vec<_>>())
    }

    #[test]
    fn ipv4_and_ipv6_nets() {
        let t = trusted(&["10.0.0.0/8", "192.168.1.7/32", "fd00::/8"]);
        assert!(t.contains("10.1.2.3".parse().unwrap()));
        assert!(t.contains("192.168.1.7".parse().unwrap()));
        assert!(!t.contains("192.168.1.8".parse().unwrap()));
        assert!(t.contains("fd12::1".parse().unwrap()));
        assert!(!t.contains("fe80::1".parse().unwrap()));
        assert!(!t.contains("11.0.0.1".parse().unwrap()));
    }

    #[test]
    fn ipv4_mapped_peers_match_ipv4_nets_only_by_their_ipv4_address() {
        let t = trusted(&["10.0.0.0/8"]);
        assert!(t.contains("::ffff:10.9.9.9".parse().unwrap()));
        assert!(!t.contains("::ffff:11.9.9.9".parse().unwrap()));
        // An IPv6 net must not swallow mapped IPv4 addresses outside it...
        let t = trusted(&["::/0"]);
        assert!(!t.contains("::ffff:1.2.3.4".parse().unwrap()));
        assert!(t.contains("2001:db8::1".parse().unwrap()));
        // ...and a mapped net means its IPv4 range.
        let t = trusted(&["::ffff:10.0.0.0/104"]);
        assert!(t.contains("10.200.0.1".parse().unwrap()));
        assert!(t.contains("::ffff:10.200.0.1".parse().unwrap()));
        assert!(!t.contains("11.0.0.1".parse().unwrap()));
    }

    #[test]
    fn nothing_trusted_by_default() {
        let t = Trusted::default();
        assert!(!t.contains("127.0.0.1".parse().unwrap()));
        assert!(!t.contains("::1".parse().unwrap()));
    }
}
