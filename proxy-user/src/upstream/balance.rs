//! Choosing an upstream for a new client: round-robin, least-conn, or
//! hashing the client's IP or MQTT client ID, by weight, over the
//! upstreams that are up. The first
//! candidate is the choice; the rest are the fallbacks tried in order when
//! a connect fails.
use std::{
    net::IpAddr,
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
};

use super::health::UpstreamState;
use crate::config::Balance;

#[derive(Debug)]
pub struct Balancer {
    kind: Balance,
    upstreams: Vec<(Arc<UpstreamState>, u32)>,
    /// Each upstream's address as the hash reads it, written once.
    names: Vec<String>,
    /// Smooth weighted round-robin's running weights, one per upstream.
    current: Mutex<Vec<i64>>,
    /// Rotates ties in least-conn so equal upstreams share the load.
    turn: AtomicUsize,
}

impl Balancer {
    /// `upstreams` with their weights; weight 0 takes no new clients.
    pub fn new(kind: Balance, upstreams: Vec<(Arc<UpstreamState>, u32)>) -> Self {
        let n = upstreams.len();
        Balancer {
            kind,
            names: upstreams.iter().map(|(u, _)| u.addr.to_string()).collect(),
            upstreams,
            current: Mutex::new(vec![0; n]),
            turn: AtomicUsize::new(0),
        }
    }

    pub fn upstreams(&self) -> impl Iterator<Item = &Arc<UpstreamState>> {
        self.upstreams.iter().map(|(u, _)| u)
    }

    /// The upstreams to try for a client, best first. Empty when every
    /// upstream is down. `client_id` is the MQTT client identifier, when
    /// the listener reads one.
    pub fn candidates(&self, client: IpAddr, client_id: Option<&str>) -> Vec<Arc<UpstreamState>> {
        let live: Vec<usize> = (0..self.upstreams.len())
            .filter(|&i| self.upstreams[i].1 > 0 && self.upstreams[i].0.is_up())
            .collect();
        let order = match self.kind {
            Balance::RoundRobin => self.round_robin(&live),
            Balance::LeastConn => self.least_conn(live),
            Balance::Source => self.rendezvous(live, &Key::Ip(client)),
            Balance::ClientId => match client_id {
                Some(id) if !id.is_empty() => self.rendezvous(live, &Key::ClientId(id)),
                // The broker will assign an ID: nothing to be sticky to
                // but the client's address.
                _ => self.rendezvous(live, &Key::Ip(client)),
            },
        };
        order
            .into_iter()
            .map(|i| self.upstreams[i].0.clone())
            .collect()
    }

    /// nginx's smooth weighted round-robin: weights 5,1,1 give a a b a c a a,
    /// not a a a a a b c. The rest follow in list order as fallbacks.
    fn round_robin(&self, live: &[usize]) -> Vec<usize> {
        let first = {
            let mut current = self.current.lock().unwrap();
            let mut total = 0;
            for &i in live {
                current[i] += i64::from(self.upstreams[i].1);
                total += i64::from(self.upstreams[i].1);
            }
            // The highest running weight; ties go to the earlier upstream.
            let Some(&best) = live.iter().rev().max_by_key(|&&i| current[i]) else {
                return Vec::new();
            };
            current[best] -= total;
            best
        };
        let at = live.iter().position(|&i| i == first).unwrap();
        live[at..].iter().chain(&live[..at]).copied().collect()
    }

    /// Fewest live connections per unit of weight first.
    fn least_conn(&self, mut live: Vec<usize>) -> Vec<usize> {
        let n = live.len().max(1);
        live.rotate_left(self.turn.fetch_add(1, Relaxed) % n);
        // active/weight compared without division; the sort is stable, so
        // ties keep the rotated order.
        let load = |i: usize| (self.upstreams[i].0.active(), u64::from(self.upstreams[i].1));
        live.sort_by(|&a, &b| {
            let ((aa, aw), (ba, bw)) = (load(a), load(b));
            (aa * bw).cmp(&(ba * aw))
        });
        live
    }

    /// Weighted rendezvous hashing: every upstream gets a score from
    /// hash(key, upstream) and the highest wins. Removing an upstream moves
    /// only the clients it had; adding one takes only the clients it now
    /// scores highest for. The hash is fixed (not randomised per process),
    /// so several splicer nodes and restarts agree.
    fn rendezvous(&self, live: Vec<usize>, key: &Key) -> Vec<usize> {
        let key = key.bytes();
        let mut scored: Vec<(f64, usize)> = live
            .into_iter()
            .map(|i| {
                let h = hash(&key, &self.names[i]);
                // A uniform number in (0, 1); score = -w / ln(u).
                let unit = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                (-f64::from(self.upstreams[i].1) / unit.ln(), i)
            })
            .collect();
        // Highest first; the sort is stable, so ties keep list order.
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        scored.into_iter().map(|(_, i)| i).collect()
    }
}

/// What a client is hashed by.
enum Key<'a> {
    Ip(IpAddr),
    ClientId(&'a str),
}

impl Key<'_> {
    /// The bytes hashed: an IP's octets (IPv4-mapped as IPv4); a client
    /// ID's UTF-8 bytes behind a 0xfe byte.
    fn bytes(&self) -> Vec<u8> {
        match self {
            Key::Ip(ip) => match splicer_proto::trust::canonical(*ip) {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            },
            Key::ClientId(id) => [&[0xfe], id.as_bytes()].concat(),
        }
    }
}

/// FNV-1a over the key's bytes (Key::bytes) and the upstream's name, then
/// a SplitMix64 finish so nearby inputs spread over all 64 bits. An IP and
/// a client ID can give the same bytes (client ID "abc" and 254.97.98.99),
/// which only sends both to the same broker. Pinned by a test: changing it
/// moves every client.
fn hash(key: &[u8], upstream: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.iter().chain(&[0xff]).chain(upstream.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Health, HealthCheck};
    use crate::upstream::health::Failure;
    use std::{net::SocketAddr, time::Duration};

    fn state(addr: &str) -> Arc<UpstreamState> {
        let m = crate::metrics::Metrics::new().upstream("balance-unit", addr);
        Arc::new(UpstreamState::new("balance-unit", addr.parse().unwrap(), m))
    }

    fn balancer(kind: Balance, ups: &[(&str, u32)]) -> Balancer {
        Balancer::new(kind, ups.iter().map(|(a, w)| (state(a), *w)).collect())
    }

    fn first(b: &Balancer, client: &str) -> SocketAddr {
        b.candidates(client.parse().unwrap(), None)[0].addr
    }

    fn port(a: SocketAddr) -> u16 {
        a.port()
    }

    fn take_down(u: &UpstreamState) {
        let h = Health {
            check: HealthCheck::Tcp,
            interval: Duration::from_secs(1),
            rise: 1,
            fall: 1,
            http: None,
        };
        u.report(&h, Err(Failure::NoAnswer(Duration::from_secs(1))));
        assert!(!u.is_up());
    }

    #[test]
    fn round_robin_rotates_and_lists_every_live_upstream_once() {
        let b = balancer(Balance::RoundRobin, &[("127.0.0.1:1", 1), ("127.0.0.1:2", 1), ("127.0.0.1:3", 1)]);
        let orders: Vec<Vec<u16>> = (0..4)
            .map(|_| b.candidates([127, 0, 0, 9].into(), None).iter().map(|u| u.addr.port()).collect())
            .collect();
        assert_eq!(orders, [vec![1, 2, 3], vec![2, 3, 1], vec![3, 1, 2], vec![1, 2, 3]]);
    }

    #[test]
    fn round_robin_is_smooth_and_weighted() {
        let b = balancer(Balance::RoundRobin, &[("127.0.0.1:1", 5), ("127.0.0.1:2", 1), ("127.0.0.1:3", 1)]);
        let seq: Vec<u16> = (0..7).map(|_| port(first(&b, "127.0.0.9"))).collect();
        assert_eq!(seq, [1, 1, 2, 1, 3, 1, 1]);
    }

    #[test]
    fn down_and_zero_weight_upstreams_get_no_clients() {
        let b = balancer(Balance::RoundRobin, &[("127.0.0.1:1", 1), ("127.0.0.1:2", 0), ("127.0.0.1:3", 1)]);
        take_down(&b.upstreams[0].0);
        for _ in 0..5 {
            let c: Vec<u16> = b.candidates([127, 0, 0, 9].into(), None).iter().map(|u| u.addr.port()).collect();
            assert_eq!(c, [3]);
        }
        take_down(&b.upstreams[2].0);
        assert!(b.candidates([127, 0, 0, 9].into(), None).is_empty());
    }

    #[test]
    fn least_conn_prefers_the_least_loaded_per_weight() {
        let b = balancer(Balance::LeastConn, &[("127.0.0.1:1", 1), ("127.0.0.1:2", 2), ("127.0.0.1:3", 1)]);
        b.upstreams[0].0.metrics.active.set(3);
        b.upstreams[1].0.metrics.active.set(4); // 2 per unit of weight
        b.upstreams[2].0.metrics.active.set(1);
        let c: Vec<u16> = b.candidates([127, 0, 0, 9].into(), None).iter().map(|u| u.addr.port()).collect();
        assert_eq!(c, [3, 2, 1]);
        // Equal loads take turns.
        for (u, _) in &b.upstreams {
            u.metrics.active.set(0);
        }
        let firsts: Vec<u16> = (0..3).map(|_| port(first(&b, "127.0.0.9"))).collect();
        let mut sorted = firsts.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [1, 2, 3], "{firsts:?}");
    }

    fn clients() -> Vec<IpAddr> {
        (0..3000u32)
            .map(|i| IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]))
            .collect()
    }

    #[test]
    fn source_is_sticky_and_removing_an_upstream_moves_only_its_clients() {
        let three = [("127.0.0.1:1", 1), ("127.0.0.1:2", 1), ("127.0.0.1:3", 1)];
        let b3 = balancer(Balance::Source, &three);
        let b2 = balancer(Balance::Source, &[three[0], three[2]]);
        let mut share = [0; 3];
        for c in clients() {
            let before = b3.candidates(c, None)[0].addr;
            assert_eq!(before, b3.candidates(c, None)[0].addr, "same client, same upstream");
            share[port(before) as usize - 1] += 1;
            let after = b2.candidates(c, None)[0].addr;
            if port(before) != 2 {
                assert_eq!(before, after, "{c} moved although its upstream stayed");
            }
        }
        // Roughly a third each (3000 clients; a fair split is 1000).
        assert!(share.iter().all(|&n| (850..1150).contains(&n)), "{share:?}");
    }

    #[test]
    fn source_skips_a_down_upstream_without_moving_the_others() {
        let b = balancer(Balance::Source, &[("127.0.0.1:1", 1), ("127.0.0.1:2", 1), ("127.0.0.1:3", 1)]);
        let before: Vec<_> = clients().into_iter().map(|c| first(&b, &c.to_string())).collect();
        take_down(&b.upstreams[0].0);
        for (c, was) in clients().into_iter().zip(before) {
            let now = first(&b, &c.to_string());
            assert_ne!(port(now), 1);
            if port(was) != 1 {
                assert_eq!(was, now);
            }
        }
    }

    #[test]
    fn source_follows_weights() {
        let b = balancer(Balance::Source, &[("127.0.0.1:1", 3), ("127.0.0.1:2", 1)]);
        let heavy = clients().into_iter().filter(|&c| port(b.candidates(c, None)[0].addr) == 1).count();
        // A 3:1 split of 3000 is 2250.
        assert!((2100..2400).contains(&heavy), "{heavy}");
    }

    #[test]
    fn the_hash_is_pinned() {
        // Several nodes, restarts and versions must agree: these values
        // may never change.
        let ip = |s: &str| Key::Ip(s.parse().unwrap()).bytes();
        assert_eq!(hash(&ip("10.0.0.1"), "127.0.0.1:1883"), PINNED_IP);
        assert_eq!(hash(&Key::ClientId("sensor-17").bytes(), "127.0.0.1:1883"), PINNED_ID);
        assert_ne!(hash(&ip("10.0.0.1"), "127.0.0.1:1883"), hash(&ip("10.0.0.2"), "127.0.0.1:1883"));
        assert_eq!(hash(&ip("::ffff:10.0.0.1"), "x"), hash(&ip("10.0.0.1"), "x"));
    }

    const PINNED_IP: u64 = 9_547_619_934_934_830_746;
    const PINNED_ID: u64 = 1_535_106_170_785_436_973;

    fn ids() -> Vec<String> {
        (0..3000).map(|i| format!("client-{i}")).collect()
    }

    #[test]
    fn client_id_is_sticky_across_addresses_and_removing_an_upstream_moves_only_its_clients() {
        let three = [("127.0.0.1:1", 1), ("127.0.0.1:2", 1), ("127.0.0.1:3", 1)];
        let b3 = balancer(Balance::ClientId, &three);
        let b2 = balancer(Balance::ClientId, &[three[0], three[2]]);
        let mut share = [0; 3];
        for (n, id) in ids().iter().enumerate() {
            let before = b3.candidates([10, 0, 0, 1].into(), Some(id))[0].addr;
            let elsewhere = b3.candidates([192, 168, (n >> 8) as u8, n as u8].into(), Some(id))[0].addr;
            assert_eq!(before, elsewhere, "{id} moved with its address");
            share[port(before) as usize - 1] += 1;
            let after = b2.candidates([10, 0, 0, 1].into(), Some(id))[0].addr;
            if port(before) != 2 {
                assert_eq!(before, after, "{id} moved although its upstream stayed");
            }
        }
        assert!(share.iter().all(|&n| (850..1150).contains(&n)), "{share:?}");
    }

    #[test]
    fn an_empty_client_id_hashes_the_address() {
        let b = balancer(Balance::ClientId, &[("127.0.0.1:1", 1), ("127.0.0.1:2", 1), ("127.0.0.1:3", 1)]);
        let s = balancer(Balance::Source, &[("127.0.0.1:1", 1), ("127.0.0.1:2", 1), ("127.0.0.1:3", 1)]);
        for c in clients() {
            assert_eq!(b.candidates(c, Some(""))[0].addr, s.candidates(c, None)[0].addr);
            assert_eq!(b.candidates(c, None)[0].addr, s.candidates(c, None)[0].addr);
        }
    }
}
