//! The MQTT workload: publishers and one subscriber, all connected through
//! the forwarder to a broker. A minimal MQTT 3.1.1 client of its own (five
//! packet types) rather than an MQTT crate: the workload needs exact control
//! of when each publish is written and acknowledged (one blocking socket
//! per publisher, QoS 1 with one message in flight, a global window), which
//! an event-loop client would hide behind its own queues.
use std::{
    io::{BufReader, BufWriter, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Condvar, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::{json, Value};

use crate::net::{connect, open_many, quantile, ready_then_wait};
use splicer_testkit::mqtt::{packet, put_str, read_packet};

pub struct Plan {
    pub target: SocketAddr,
    pub publishers: usize,
    pub messages: u64,
    pub qos: u8,
    pub payload: usize,
    pub window: u64,
    /// Messages per second from all publishers together; 0: as fast as the
    /// window allows.
    pub rate: f64,
    pub max_time: Duration,
}

/// How long the subscriber may lag behind the last publish.
const GRACE: Duration = Duration::from_secs(5);

pub fn run(p: &Plan) -> Result<Value> {
    ensure!(p.qos <= 1, "QoS 0 or 1");
    // Payloads carry their send time as nanoseconds since t0; the subscriber
    // is in this process, so one monotonic clock serves both ends.
    let t0 = Instant::now();
    let pid = std::process::id();
    let sub = Mqtt::connect(p.target, &format!("bench-sub-{pid}"))?;
    let pubs = (0..p.publishers)
        .map(|i| Mqtt::connect(p.target, &format!("bench-pub-{pid}-{i}")))
        .collect::<Result<Vec<_>>>()?;
    let window = Arc::new(Window::new(p.window));
    let sub = Subscriber::start(sub, "bench/#", p.qos, window.clone(), t0)?;

    let start = Instant::now();
    let deadline = start + p.max_time;
    let each = p.messages / p.publishers as u64;
    // Paced: each publisher sends every `interval`, the publishers evenly
    // staggered, so the broker sees a steady stream rather than bursts.
    let interval = (p.rate > 0.0).then(|| Duration::from_secs_f64(p.publishers as f64 / p.rate));
    let senders: Vec<_> = pubs
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let window = window.clone();
            let (qos, size) = (p.qos, p.payload.max(8));
            let pace = interval.map(|iv| (start + iv.mul_f64(i as f64 / p.publishers as f64), iv));
            thread::spawn(move || c.publish_all(i, each, qos, size, &window, pace, t0, deadline))
        })
        .collect();
    let mut sent = 0;
    for s in senders {
        sent += s.join().expect("publisher thread panicked")?;
    }
    let (received, mut lat_us, last) = sub.finish(sent)?;
    ensure!(
        received == sent,
        "QoS {}: the subscriber received {received} of {sent} messages",
        p.qos
    );
    let secs = last.duration_since(start).as_secs_f64();
    Ok(json!({
        "qos": p.qos,
        "publishers": p.publishers,
        "sent": sent,
        "received": received,
        "secs": secs,
        "msgs_per_s": received as f64 / secs,
        "p50_us": quantile(&mut lat_us, 0.5),
        "p99_us": quantile(&mut lat_us, 0.99),
        "stopped_by_time": sent < each * p.publishers as u64,
    }))
}

/// The subscriber of a workload, reading on a thread of its own.
struct Subscriber {
    got: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    sock: TcpStream,
    thread: thread::JoinHandle<Result<(u64, Vec<f64>, Instant)>>,
}

impl Subscriber {
    /// Subscribes `sub` to `filter` and starts reading; each message
    /// received frees a slot of `window`.
    fn start(mut sub: Mqtt, filter: &str, qos: u8, window: Arc<Window>, t0: Instant) -> Result<Subscriber> {
        sub.subscribe(filter, qos)?;
        let got = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let sock = sub.w.get_ref().try_clone()?;
        let thread = {
            let (got, stop) = (got.clone(), stop.clone());
            thread::spawn(move || receive(sub, &window, &got, &stop, t0))
        };
        Ok(Subscriber {
            got,
            stop,
            sock,
            thread,
        })
    }

    /// Waits (GRACE at most) until `sent` messages arrived, then unblocks
    /// the read; returns what `receive` does.
    fn finish(self, sent: u64) -> Result<(u64, Vec<f64>, Instant)> {
        let caught_up = Instant::now() + GRACE;
        while self.got.load(Ordering::Relaxed) < sent && Instant::now() < caught_up {
            thread::sleep(Duration::from_millis(1));
        }
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.sock.shutdown(Shutdown::Both);
        self.thread.join().expect("subscriber thread panicked")
    }
}

/// Reads PUBLISHes until told to stop; returns the count, each one's
/// publish-to-receive latency and when the last arrived.
fn receive(
    mut sub: Mqtt,
    window: &Window,
    got: &AtomicU64,
    stop: &AtomicBool,
    t0: Instant,
) -> Result<(u64, Vec<f64>, Instant)> {
    let (mut n, mut lat_us, mut last) = (0u64, Vec::new(), Instant::now());
    loop {
        // Once told to stop, the socket is shut down under us: whatever
        // fails then (reading the next packet, writing an ack) is the end.
        let (kind, body) = match read_packet(&mut sub.r) {
            Ok(p) => p,
            Err(_) if stop.load(Ordering::Relaxed) => return Ok((n, lat_us, last)),
            Err(e) => bail!("subscriber: {e} after {n} messages"),
        };
        ensure!(kind >> 4 == 3, "subscriber: unexpected packet {kind:#x}");
        let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
        let mut at = 2 + topic_len;
        let mut acked = Ok(());
        if (kind >> 1) & 3 > 0 {
            // Acknowledged in batches: written out when no more input is
            // buffered, as a client library would.
            acked = sub.w.write_all(&packet(0x40, &body[at..at + 2]));
            if acked.is_ok() && sub.r.buffer().is_empty() {
                acked = sub.w.flush();
            }
            at += 2;
        }
        let sent_ns = u64::from_le_bytes(body[at..at + 8].try_into()?);
        last = Instant::now();
        lat_us.push((last.duration_since(t0).as_nanos() as u64 - sent_ns) as f64 / 1e3);
        n += 1;
        got.store(n, Ordering::Relaxed);
        window.release();
        match acked {
            Err(_) if stop.load(Ordering::Relaxed) => return Ok((n, lat_us, last)),
            Err(e) => bail!("subscriber: cannot acknowledge: {e} after {n} messages"),
            Ok(()) => {}
        }
    }
}

/// A counting semaphore: how many messages may be on their way at once.
struct Window {
    out: Mutex<u64>,
    freed: Condvar,
    max: u64,
}

impl Window {
    fn new(max: u64) -> Self {
        Window {
            out: Mutex::new(0),
            freed: Condvar::new(),
            max,
        }
    }

    /// Takes a slot; false if `deadline` passes first.
    fn acquire(&self, deadline: Instant) -> bool {
        let mut out = self.out.lock().unwrap();
        while *out >= self.max {
            if Instant::now() >= deadline {
                return false;
            }
            out = self
                .freed
                .wait_timeout(out, Duration::from_millis(50))
                .unwrap()
                .0;
        }
        *out += 1;
        true
    }

    fn release(&self) {
        let mut out = self.out.lock().unwrap();
        *out = out.saturating_sub(1);
        self.freed.notify_one();
    }
}

/// One MQTT connection: buffered reads, buffered writes (flushed by hand).
struct Mqtt {
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
}

impl Mqtt {
    /// CONNECT with a clean session and no keep-alive (runs are short);
    /// waits for a successful CONNACK.
    fn connect(to: SocketAddr, id: &str) -> Result<Mqtt> {
        let s = connect(to)?;
        let mut m = Mqtt {
            r: BufReader::new(s.try_clone()?),
            w: BufWriter::new(s),
        };
        let mut body = Vec::new();
        put_str(&mut body, b"MQTT");
        body.extend([4, 0x02, 0, 0]); // 3.1.1, clean session, keep-alive 0
        put_str(&mut body, id.as_bytes());
        m.send(&packet(0x10, &body))?;
        let (kind, ack) = read_packet(&mut m.r).with_context(|| format!("{id}: no CONNACK"))?;
        ensure!(
            kind == 0x20 && ack.get(1) == Some(&0),
            "{id}: connection refused ({kind:#x} {ack:?})"
        );
        Ok(m)
    }

    fn subscribe(&mut self, filter: &str, qos: u8) -> Result<()> {
        let mut body = vec![0, 1]; // packet id 1
        put_str(&mut body, filter.as_bytes());
        body.push(qos);
        self.send(&packet(0x82, &body))?;
        let (kind, ack) = read_packet(&mut self.r).context("no SUBACK")?;
        ensure!(
            kind == 0x90 && ack.get(2) == Some(&qos),
            "subscription refused ({kind:#x} {ack:?})"
        );
        Ok(())
    }

    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.w.write_all(bytes)?;
        self.w.flush()?;
        Ok(())
    }

    /// One PUBLISH of `payload` to `topic`, its first 8 bytes set to the
    /// time since `t0` (the subscriber's latency clock).
    fn publish(&mut self, topic: &str, qos: u8, pkid: u16, payload: &mut [u8], t0: Instant) -> Result<()> {
        payload[..8].copy_from_slice(&(t0.elapsed().as_nanos() as u64).to_le_bytes());
        let mut body = Vec::with_capacity(topic.len() + payload.len() + 4);
        put_str(&mut body, topic.as_bytes());
        if qos > 0 {
            body.extend(pkid.to_be_bytes());
        }
        body.extend(&*payload);
        self.send(&packet(0x30 | qos << 1, &body))
    }

    /// Publishes up to `n` messages to `bench/<id>`, each when the window
    /// has room (and, if paced, at first_at + k * interval); at QoS 1 waits
    /// for each PUBACK before the next, as a device with one message in
    /// flight does. Returns how many were sent.
    #[allow(clippy::too_many_arguments)]
    fn publish_all(
        mut self,
        id: usize,
        n: u64,
        qos: u8,
        size: usize,
        window: &Window,
        pace: Option<(Instant, Duration)>,
        t0: Instant,
        deadline: Instant,
    ) -> Result<u64> {
        let topic = format!("bench/{id}");
        let mut payload = vec![0x42_u8; size];
        let mut sent = 0;
        while sent < n && window.acquire(deadline) {
            if let Some((first, interval)) = pace {
                let at = first + interval.mul_f64(sent as f64);
                if at >= deadline {
                    break;
                }
                thread::sleep(at.saturating_duration_since(Instant::now()));
            }
            let pkid = (sent % 65535 + 1) as u16;
            self.publish(&topic, qos, pkid, &mut payload, t0)?;
            if qos > 0 {
                let (kind, ack) = read_packet(&mut self.r)
                    .with_context(|| format!("publisher {id}: no PUBACK for {pkid}"))?;
                ensure!(
                    kind == 0x40 && ack == pkid.to_be_bytes(),
                    "publisher {id}: expected PUBACK {pkid}, got {kind:#x} {ack:?}"
                );
            }
            sent += 1;
        }
        self.send(&[0xe0, 0])?; // DISCONNECT
        Ok(sent)
    }
}

/// One client of a reconnect storm: connect, CONNECT, wait for the
/// CONNACK, DISCONNECT, close.
pub fn reconnect(target: SocketAddr, i: u64) -> Result<()> {
    let mut m = Mqtt::connect(target, &format!("storm-{}-{i}", std::process::id()))?;
    m.send(&[0xe0, 0])
}

/// The fleet workload: many devices, each connected and mostly idle.
pub struct Fleet {
    pub target: SocketAddr,
    pub conns: usize,
    /// Messages per second from the whole fleet, each from the next client
    /// in turn: every client publishes once per conns / rate seconds.
    pub rate: f64,
    pub duration: Duration,
    pub payload: usize,
}

/// Connects the fleet and one subscriber (to `fleet/#`), says `ready` and
/// waits for a line on stdin (xtask measures from there), then publishes
/// at QoS 0, paced, and reports what the subscriber received and how late.
pub fn fleet(p: &Fleet) -> Result<Value> {
    let t0 = Instant::now();
    let pid = std::process::id();
    let sub = Mqtt::connect(p.target, &format!("fleet-sub-{pid}"))?;
    let target = p.target;
    let mut fleet = open_many(p.conns, move |i| Mqtt::connect(target, &format!("fleet-{pid}-{i}")))?;
    ready_then_wait(&json!({"event": "ready", "conns": fleet.len(), "secs": t0.elapsed().as_secs_f64()}))?;
    // No window: the pace is the bound.
    let sub = Subscriber::start(sub, "fleet/#", 0, Arc::new(Window::new(u64::MAX)), t0)?;
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / p.rate);
    let topics: Vec<String> = (0..fleet.len()).map(|i| format!("fleet/{i}")).collect();
    let mut payload = vec![0x42_u8; p.payload.max(8)];
    let mut sent = 0u64;
    loop {
        let at = start + interval.mul_f64(sent as f64);
        if at >= start + p.duration {
            break;
        }
        thread::sleep(at.saturating_duration_since(Instant::now()));
        let i = sent as usize % fleet.len();
        fleet[i].publish(&topics[i], 0, 0, &mut payload, t0)?;
        sent += 1;
    }
    let (received, mut lat_us, _) = sub.finish(sent)?;
    ensure!(received == sent, "fleet: the subscriber received {received} of {sent} messages");
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({
        "conns": fleet.len(),
        "sent": sent,
        "received": received,
        "secs": secs,
        "msgs_per_s": received as f64 / p.duration.as_secs_f64(),
        "p50_us": quantile(&mut lat_us, 0.5),
        "p99_us": quantile(&mut lat_us, 0.99),
        "max_us": quantile(&mut lat_us, 1.0),
    }))
}

