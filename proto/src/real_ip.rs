//! The real client's address from an X-Forwarded-For-style list, as nginx's
//! realip module finds it (`set_real_ip_from`, `real_ip_header`,
//! `real_ip_recursive`).
use std::net::{IpAddr, SocketAddr};

use crate::trust::{canonical, Trusted};

/// Who the walk found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub ip: IpAddr,
    /// Its index in the list; None when it is the peer itself.
    pub index: Option<usize>,
    /// Its port, when the entry carried one (`1.2.3.4:5678`,
    /// `[2001:db8::1]:5678`, as nginx 1.11 reads them).
    pub port: Option<u16>,
}

/// `peer` is the direct TCP peer; `list` the header's addresses, left (the
/// first hop) to right (the last hop). An untrusted peer's header counts for
/// nothing. Otherwise, without `recursive` the rightmost address wins; with
/// it, the rightmost one that is not itself trusted (the leftmost if all
/// are). An entry that is not an IP address (with or without a port) ends
/// the walk: the last good address found so far stands.
pub fn find(peer: IpAddr, list: &[String], trusted: &Trusted, recursive: bool) -> Found {
    let peer = canonical(peer);
    let mut found = Found {
        ip: peer,
        index: None,
        port: None,
    };
    if !trusted.contains(peer) {
        return found;
    }
    for (index, entry) in list.iter().enumerate().rev() {
        let Some((ip, port)) = parse_entry(entry) else {
            break;
        };
        found = Found {
            ip: canonical(ip),
            index: Some(index),
            port,
        };
        if !recursive || !trusted.contains(found.ip) {
            break;
        }
    }
    found
}

/// [`find`]'s address alone.
pub fn resolve(peer: IpAddr, list: &[String], trusted: &Trusted, recursive: bool) -> IpAddr {
    find(peer, list, trusted, recursive).ip
}

fn parse_entry(entry: &str) -> Option<(IpAddr, Option<u16>)> {
    match entry.parse::<IpAddr>() {
        Ok(ip) => Some((ip, None)),
        Err(_) => entry.parse::<SocketAddr>().ok().map(|a| (a.ip(), Some(a.port()))),
    }
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
    fn entries_may_carry_a_port_and_say_where_they_stand() {
        let trusted = t(&["10.0.0.0/8"]);
        let chain = list("115.236.21.86:4711, 10.0.0.1, [2001:db8::7]:99");
        assert_eq!(
            find(ip("10.0.0.3"), &chain, &trusted, false),
            Found { ip: ip("2001:db8::7"), index: Some(2), port: Some(99) }
        );
        let chain = list("115.236.21.86:4711, 10.0.0.1");
        assert_eq!(
            find(ip("10.0.0.3"), &chain, &trusted, true),
            Found { ip: ip("115.236.21.86"), index: Some(0), port: Some(4711) }
        );
        assert_eq!(find(ip("10.0.0.3"), &list(""), &trusted, true).index, None);
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
