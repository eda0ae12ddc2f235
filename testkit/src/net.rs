//! Ports and listeners on loopback addresses.
use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    sync::atomic::{AtomicU32, Ordering},
};

/// Ports handed out: 20000 up to the start of Linux's default ephemeral
/// range (32768), so that no client connection can take one of them
/// between the check here and a (re)start that binds it.
const PORTS: std::ops::Range<u32> = 20000..32768;

/// A port that was free on `ip` a moment ago. Each process starts at its
/// own offset and counts up, so parallel tests in one process never pick
/// the same port and concurrent processes rarely try the same one.
pub fn free_port(ip: Ipv4Addr) -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = PORTS.end - PORTS.start;
    let offset = std::process::id() % 128 * 100;
    loop {
        let n = offset + NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (PORTS.start + n % span) as u16;
        if TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
}

/// Whether something LISTENs on `addr`, from /proc/net/tcp: connecting to
/// find out would be a connection a proxy or forwarder forwards (and
/// counts, and logs).
pub fn is_listening(addr: SocketAddr) -> bool {
    let SocketAddr::V4(a) = addr else {
        return false;
    };
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(a.ip().octets()),
        a.port()
    );
    fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&want.as_str()) && f.get(3) == Some(&"0A")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_in_range_and_handed_out_once() {
        let ip = Ipv4Addr::LOCALHOST;
        let port = free_port(ip);
        assert!(PORTS.contains(&u32::from(port)));
        assert_ne!(free_port(ip), port, "handed out twice");
    }

    #[test]
    fn a_listener_shows_while_it_listens() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = l.local_addr().unwrap();
        assert!(is_listening(addr));
        drop(l);
        // A child that another test thread forks at that moment holds the
        // socket until it execs (CLOEXEC): wait that out.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while is_listening(addr) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!is_listening(addr));
    }
}
