//! The real client's address from an X-Forwarded-For-style list, as nginx's
//! realip module finds it (`set_real_ip_from`, `real_ip_header`,
//! `real_ip_recursive`).
use std::net::IpAddr;

use crate::trust::{canonical, Trusted};

/// `peer` is the direct TCP peer; `list` the header's addresses, left (the
/// first hop) to right (the last hop). An untrusted peer's header counts for
/// nothing. Otherwise, without `recursive` the rightmost address wins; with
/// it, the rightmost one that is not itself trusted (the leftmost if all
/// are). An entry that is not an IP address ends the walk: the last good
/// address found so far stands.
pub fn resolve(peer: IpAddr, list: &[String], trusted: &Trusted, recursive: bool) -> IpAddr {
    let peer = canonical(peer);
    if !trusted.contains(peer) {
        return peer;
    }
    let mut found = peer;
    for entry in list.iter().rev() {
        let Ok(ip) = entry.parse::<IpAddr>() else {
            break;
        };
        found = canonical(ip);
        if !recursive || !trusted.contains(found) {
            break;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(nets: &[&str]) -> Trusted {
        Trusted::new(&nets.iter().map(|n| n.parse().unwrap()).collect::<Vec<_>>())
    }

    fn list(s: &str) -> Vec<String> {
        s.split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_it_claims() {
        let trusted = t(&["10.0.0.0/8"]);
        assert_eq!(
            resolve(ip("1.1.1.1"), &list("127.0.0.1"), &trusted, true),
            ip("1.1.1.1")
        );
        assert_eq!(
            resolve(ip("1.1.1.1"), &list("127.0.0.1"), &trusted, false),
            ip("1.1.1.1")
        );
    }

    #[test]
    fn not_recursive_takes_the_rightmost() {
        let trusted = t(&["10.0.0.0/8"]);
        // The guide's last capture: without recursion, X-Real-IP is the last hop.
        assert_eq!(
            resolve(
                ip("10.0.0.3"),
                &list("115.236.21.86, 10.0.0.1, 10.0.0.2"),
                &trusted,
                false
            ),
            ip("10.0.0.2")
        );
        assert_eq!(
            resolve(ip("10.0.0.3"), &list(""), &trusted, false),
            ip("10.0.0.3")
        );
    }

    #[test]
    fn recursive_skips_trusted_hops_from_the_right() {
        let trusted = t(&["10.0.0.0/8"]);
        let chain = list("6.6.6.6, 115.236.21.86, 10.0.0.1, 10.0.0.2");
        assert_eq!(
            resolve(ip("10.0.0.3"), &chain, &trusted, true),
            ip("115.236.21.86")
        );
        // All trusted: the leftmost.
        assert_eq!(
            resolve(ip("10.0.0.3"), &list("10.0.0.1, 10.0.0.2"), &trusted, true),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn garbage_ends_the_walk() {
        let trusted = t(&["10.0.0.0/8"]);
        assert_eq!(
            resolve(
                ip("10.0.0.3"),
                &list("1.2.3.4, unknown, 10.0.0.1"),
                &trusted,
                true
            ),
            ip("10.0.0.1")
        );
        assert_eq!(
            resolve(ip("10.0.0.3"), &list("1.2.3.4, nonsense"), &trusted, true),
            ip("10.0.0.3")
        );
    }

    #[test]
    fn ipv6_and_mapped() {
        let trusted = t(&["fd00::/8", "10.0.0.0/8"]);
        assert_eq!(
            resolve(ip("fd00::1"), &list("2001:db8::7"), &trusted, false),
            ip("2001:db8::7")
        );
        assert_eq!(
            resolve(
                ip("::ffff:10.0.0.9"),
                &list("::ffff:1.2.3.4"),
                &trusted,
                false
            ),
            ip("1.2.3.4")
        );
    }
}
