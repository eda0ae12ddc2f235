//! Upstream health, HAProxy style: `fall` consecutive failures (active
//! checks, or connects made for clients) take an upstream down, `rise`
//! consecutive good checks bring it back. A down upstream gets no new
//! clients. State changes are logged and exported.
use std::{
    fmt, io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering::Relaxed},
        Arc, LazyLock,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use splicer_proto::proxy_protocol;

use crate::{
    config::{Health, HealthCheck, HttpCheck, SendProxy},
    metrics::UpstreamMetrics,
};

/// Why a check, or a connect made for a client, failed.
#[derive(Debug)]
pub enum Failure {
    Connect(io::Error),
    ConnectTimeout(Duration),
    /// The whole check got no answer in time.
    NoAnswer(Duration),
    Write(io::Error),
    NoConnack(io::Error),
    /// A CONNACK with this return code.
    Refused(u8),
    NotConnack([u8; 4]),
    /// An HTTP answer with another status than the one expected.
    HttpStatus(u16),
    /// No HTTP answer: closed, failed, or not HTTP.
    NoHttpAnswer(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "connect failed: {e}"),
            Failure::ConnectTimeout(t) => write!(f, "connect timed out after {t:?}"),
            Failure::NoAnswer(t) => write!(f, "no answer within {t:?}"),
            Failure::Write(e) => write!(f, "write: {e}"),
            Failure::NoConnack(e) => write!(f, "no CONNACK: {e}"),
            Failure::Refused(rc) => write!(f, "CONNACK refused the check, return code {rc}"),
            Failure::NotConnack(b) => write!(f, "not a CONNACK: {b:02x?}"),
            Failure::HttpStatus(s) => write!(f, "HTTP {s}"),
            Failure::NoHttpAnswer(why) => write!(f, "no HTTP answer: {why}"),
        }
    }
}

/// One upstream of one listener. Kept across reloads while the listener
/// still lists the address, so its state and live count carry over.
#[derive(Debug)]
pub struct UpstreamState {
    pub addr: SocketAddr,
    listener: String,
    up: AtomicBool,
    /// Consecutive successes while down, failures while up.
    streak: AtomicU32,
    pub metrics: UpstreamMetrics,
}

impl UpstreamState {
    pub fn new(listener: &str, addr: SocketAddr, metrics: UpstreamMetrics) -> Self {
        metrics.up.set(1);
        UpstreamState {
            addr,
            listener: listener.to_string(),
            up: AtomicBool::new(true),
            streak: AtomicU32::new(0),
            metrics,
        }
    }

    /// Health checks were turned off: nothing will ever bring it back, so
    /// it is up from now on.
    pub fn force_up(&self) {
        self.streak.store(0, Relaxed);
        if !self.up.swap(true, Relaxed) {
            self.metrics.up.set(1);
            log::info!("[{}] upstream {} is UP (health checks turned off)", self.listener, self.addr);
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Live client connections to this upstream (least-conn).
    pub fn active(&self) -> u64 {
        self.metrics.active.get().max(0) as u64
    }

    /// Records one check or connect result.
    pub fn report(&self, health: &Health, result: Result<(), Failure>) {
        if health.check == HealthCheck::Off {
            return;
        }
        let up = self.is_up();
        match (&result, up) {
            // The normal cases: nothing to count.
            (Ok(()), true) | (Err(_), false) => self.streak.store(0, Relaxed),
            (Ok(()), false) => self.step(health.rise, true, "UP", &result),
            (Err(_), true) => self.step(health.fall, false, "DOWN", &result),
        }
    }

    fn step(&self, needed: u32, to: bool, word: &str, result: &Result<(), Failure>) {
        let n = self.streak.fetch_add(1, Relaxed) + 1;
        if n < needed {
            return;
        }
        // Only the caller that flips the state logs it.
        if self.up.swap(to, Relaxed) != to {
            self.streak.store(0, Relaxed);
            self.metrics.up.set(i64::from(to));
            let why = match result {
                Ok(()) => format!("{n} good checks"),
                Err(e) => format!("{n} failures in a row, last: {e}"),
            };
            log::warn!("[{}] upstream {} is {word} ({why})", self.listener, self.addr);
        }
    }
}

/// Checks one upstream every `interval` until the task is aborted (on
/// reload or removal of the listener).
pub async fn check_loop(
    state: Arc<UpstreamState>,
    health: Health,
    send_proxy: SendProxy,
    timeout: Duration,
) {
    let timeout = timeout.min(health.interval);
    let mut tick = tokio::time::interval(health.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = match tokio::time::timeout(timeout, check(state.addr, &health, send_proxy)).await {
            Ok(r) => r,
            Err(_) => Err(Failure::NoAnswer(timeout)),
        };
        if result.is_err() {
            state.metrics.failures.inc();
        }
        state.report(&health, result);
    }
}

/// One check: a TCP connect, an MQTT CONNECT that must get a CONNACK with
/// return code 0, or an HTTP GET that must get the expected status.
async fn check(addr: SocketAddr, health: &Health, send_proxy: SendProxy) -> Result<(), Failure> {
    if let Some(http) = &health.http {
        return http_check(addr, http).await;
    }
    let mut s = TcpStream::connect(addr).await.map_err(Failure::Connect)?;
    if health.check != HealthCheck::Mqtt {
        return Ok(());
    }
    // A broker that expects PROXY headers gets one saying "local": a
    // check of the proxy itself, with no client behind it (HAProxy's
    // check-send-proxy does the same).
    let mut packet = send_proxy
        .version()
        .map_or_else(Vec::new, proxy_protocol::local_header);
    packet.extend_from_slice(&mqtt_connect(&CLIENT_ID));
    s.write_all(&packet).await.map_err(Failure::Write)?;
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.map_err(Failure::NoConnack)?;
    match connack {
        [0x20, 0x02, _, 0] => {
            let _ = s.write_all(&[0xE0, 0x00]).await; // DISCONNECT
            Ok(())
        }
        [0x20, 0x02, _, rc] => Err(Failure::Refused(rc)),
        other => Err(Failure::NotConnack(other)),
    }
}

/// The longest HTTP answer head read: a status line and a few headers.
const HTTP_HEAD_MAX: usize = 8 * 1024;

/// GET `path` on the upstream's address (at `port`), with no PROXY header:
/// the API that answers it (EMQX's dashboard port) does not take one.
async fn http_check(addr: SocketAddr, c: &HttpCheck) -> Result<(), Failure> {
    let at = SocketAddr::new(addr.ip(), c.port.unwrap_or(addr.port()));
    let mut s = TcpStream::connect(at).await.map_err(Failure::Connect)?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {at}\r\nUser-Agent: splicer-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        c.path
    );
    s.write_all(request.as_bytes()).await.map_err(Failure::Write)?;
    let mut head = Vec::with_capacity(1024);
    loop {
        // Parsed once the head is whole: a server sending a byte at a time
        // costs one scan, not one per byte.
        if !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < HTTP_HEAD_MAX {
            match s.read_buf(&mut head).await {
                Ok(0) => return Err(Failure::NoHttpAnswer("closed before a whole head".into())),
                Ok(_) => continue,
                Err(e) => return Err(Failure::NoHttpAnswer(e.to_string())),
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut answer = httparse::Response::new(&mut headers);
        match answer.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {
                let status = answer.code.unwrap_or(0);
                return match status == c.status {
                    true => Ok(()),
                    false => Err(Failure::HttpStatus(status)),
                };
            }
            Ok(httparse::Status::Partial) if head.len() < HTTP_HEAD_MAX => {}
            Ok(httparse::Status::Partial) => return Err(Failure::NoHttpAnswer("a head over 8 KiB".into())),
            Err(e) => return Err(Failure::NoHttpAnswer(e.to_string())),
        }
        match s.read_buf(&mut head).await {
            Ok(0) => return Err(Failure::NoHttpAnswer("closed before a whole head".into())),
            Ok(_) => {}
            Err(e) => return Err(Failure::NoHttpAnswer(e.to_string())),
        }
    }
}

/// One client id per process: brokers drop an existing session when the
/// same id connects again, so several splicer nodes checking one broker
/// must not share an id.
static CLIENT_ID: LazyLock<String> = LazyLock::new(|| {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("splicer-health-check-{:x}-{nonce:08x}", std::process::id())
});

/// MQTT 3.1.1 CONNECT: clean session, keep-alive 60 s, no will, no login.
fn mqtt_connect(client_id: &str) -> Vec<u8> {
    let id = client_id.as_bytes();
    let mut p = vec![0x10, (12 + id.len()) as u8];
    p.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60]);
    p.extend_from_slice(&(id.len() as u16).to_be_bytes());
    p.extend_from_slice(id);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(rise: u32, fall: u32) -> Health {
        Health {
            check: HealthCheck::Tcp,
            interval: Duration::from_secs(1),
            rise,
            fall,
            http: None,
        }
    }

    fn refused() -> Failure {
        Failure::Connect(io::ErrorKind::ConnectionRefused.into())
    }

    fn state() -> UpstreamState {
        let m = crate::metrics::Metrics::new().upstream("health-unit", "127.0.0.1:1");
        UpstreamState::new("health-unit", "127.0.0.1:1".parse().unwrap(), m)
    }

    #[test]
    fn falls_after_fall_failures_in_a_row_and_rises_after_rise() {
        let h = health(2, 3);
        let s = state();
        let fail = || Err(refused());
        s.report(&h, fail());
        s.report(&h, fail());
        s.report(&h, Ok(())); // breaks the streak
        s.report(&h, fail());
        s.report(&h, fail());
        assert!(s.is_up());
        s.report(&h, fail());
        assert!(!s.is_up());
        assert_eq!(s.metrics.up.get(), 0);
        s.report(&h, Ok(()));
        s.report(&h, fail()); // breaks the streak
        s.report(&h, Ok(()));
        assert!(!s.is_up());
        s.report(&h, Ok(()));
        assert!(s.is_up());
        assert_eq!(s.metrics.up.get(), 1);
    }

    #[test]
    fn off_never_marks_down() {
        let h = Health {
            check: HealthCheck::Off,
            ..health(1, 1)
        };
        let s = state();
        s.report(&h, Err(refused()));
        assert!(s.is_up());
    }

    #[test]
    fn connect_packet_is_whole_and_ids_are_per_process() {
        let p = mqtt_connect("abc");
        assert_eq!(p, [0x10, 15, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 3, b'a', b'b', b'c']);
        assert!(CLIENT_ID.starts_with("splicer-health-check-"));
        assert!(CLIENT_ID.len() < 100, "one length byte is enough");
    }

    #[test]
    fn force_up_clears_a_down_state() {
        let h = health(1, 1);
        let s = state();
        s.report(&h, Err(refused()));
        assert!(!s.is_up());
        s.force_up();
        assert!(s.is_up());
        assert_eq!(s.metrics.up.get(), 1);
    }
}
