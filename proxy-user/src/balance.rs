//! Choosing an upstream: round-robin over a listener's upstreams, with the
//! rest in order as fallbacks when a connect fails.
use std::{
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
};

#[derive(Debug)]
pub struct RoundRobin {
    upstreams: Vec<SocketAddr>,
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn new(upstreams: Vec<SocketAddr>) -> Self {
        RoundRobin {
            upstreams,
            next: AtomicUsize::new(0),
        }
    }

    /// Every upstream once, starting at the next one in turn.
    pub fn candidates(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        let n = self.upstreams.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).map(move |i| self.upstreams[(start + i) % n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_and_lists_every_upstream_once() {
        let a: Vec<SocketAddr> = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let rr = RoundRobin::new(a.clone());
        let firsts: Vec<_> = (0..4)
            .map(|_| rr.candidates().collect::<Vec<_>>())
            .collect();
        assert_eq!(firsts[0], vec![a[0], a[1], a[2]]);
        assert_eq!(firsts[1], vec![a[1], a[2], a[0]]);
        assert_eq!(firsts[2], vec![a[2], a[0], a[1]]);
        assert_eq!(firsts[3], vec![a[0], a[1], a[2]]);
    }
}
