//! The TCP workloads. Plain blocking sockets and threads: each workload
//! keeps few connections busy at a time (idle ones just sit in a Vec), and
//! this is the simplest code whose cost is the same for every forwarder.
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use serde_json::{json, Value};

use crate::net::{connect, open_many, quantile, ready_then_wait};

/// `bytes` in total over `conns` connections (split evenly), client to
/// server. Sending stops early at `max_time`; the server's count must equal
/// what was sent either way.
pub fn bulk(target: SocketAddr, bytes: u64, conns: usize, max_time: Duration) -> Result<Value> {
    let start = Instant::now();
    let deadline = start + max_time;
    let each = bytes / conns as u64;
    let senders: Vec<_> = (0..conns)
        .map(|_| thread::spawn(move || send_counted(target, each, deadline)))
        .collect();
    let mut sent = 0;
    for s in senders {
        sent += s.join().expect("sender thread panicked")?;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({
        "bytes": sent,
        "conns": conns,
        "secs": secs,
        "gb_per_s": sent as f64 / secs / 1e9,
        "stopped_by_time": sent < each * conns as u64,
    }))
}

fn send_counted(target: SocketAddr, len: u64, deadline: Instant) -> Result<u64> {
    let mut s = connect(target)?;
    s.write_all(b"D")?;
    let buf = vec![0x5a_u8; 256 * 1024];
    let mut sent = 0u64;
    while sent < len && Instant::now() < deadline {
        let n = (len - sent).min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])
            .with_context(|| format!("write after {sent} bytes"))?;
        sent += n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count)
        .with_context(|| format!("no byte count from the server after sending {sent}"))?;
    let got = u64::from_le_bytes(count);
    ensure!(got == sent, "the server received {got} of {sent} bytes");
    Ok(sent)
}

/// `rounds` exchanges of `size` bytes on one connection, after 100 warm-up
/// rounds that are not counted; each reply must equal its request.
pub fn pingpong(
    target: SocketAddr,
    rounds: usize,
    size: usize,
    max_time: Duration,
) -> Result<Value> {
    let mut s = connect(target)?;
    s.write_all(b"E")?;
    let (mut req, mut resp) = (vec![0x33_u8; size.max(8)], vec![0u8; size.max(8)]);
    let warmup = 100;
    let mut rtt_us = Vec::with_capacity(rounds);
    let start = Instant::now();
    for i in 0..warmup + rounds {
        if start.elapsed() > max_time {
            break;
        }
        req[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let t = Instant::now();
        s.write_all(&req)?;
        s.read_exact(&mut resp)
            .with_context(|| format!("no reply to round {i}"))?;
        let dt = t.elapsed();
        ensure!(resp == req, "round {i}: the reply differs from the request");
        if i >= warmup {
            rtt_us.push(dt.as_secs_f64() * 1e6);
        }
    }
    let n = rtt_us.len();
    let mean = rtt_us.iter().sum::<f64>() / n as f64;
    Ok(json!({
        "rounds": n,
        "secs": start.elapsed().as_secs_f64(),
        "p50_us": quantile(&mut rtt_us, 0.5),
        "p99_us": quantile(&mut rtt_us, 0.99),
        "mean_us": mean,
    }))
}

/// `conns` short connections, `concurrency` at a time, each one
/// `exchange(target, i)` (short_exchange, an MQTT CONNECT and DISCONNECT,
/// or a TLS handshake). Every one must succeed.
pub fn connrate(
    target: SocketAddr,
    conns: usize,
    concurrency: usize,
    max_time: Duration,
    exchange: impl Fn(SocketAddr, u64) -> Result<()> + Send + Sync + 'static,
) -> Result<Value> {
    let next = Arc::new(AtomicUsize::new(0));
    let exchange = Arc::new(exchange);
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, exchange) = (next.clone(), exchange.clone());
            thread::spawn(move || -> Result<Vec<f64>> {
                let mut lat_us = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= conns || start.elapsed() > max_time {
                        return Ok(lat_us);
                    }
                    let t = Instant::now();
                    exchange(target, i as u64).with_context(|| format!("short connection {i}"))?;
                    lat_us.push(t.elapsed().as_secs_f64() * 1e6);
                }
            })
        })
        .collect();
    let mut lat_us = Vec::with_capacity(conns);
    for w in workers {
        lat_us.extend(w.join().expect("worker thread panicked")?);
    }
    let secs = start.elapsed().as_secs_f64();
    let n = lat_us.len();
    Ok(json!({
        "conns": n,
        "secs": secs,
        "conns_per_s": n as f64 / secs,
        "p50_us": quantile(&mut lat_us, 0.5),
        "p99_us": quantile(&mut lat_us, 0.99),
    }))
}

/// Connect, send the command and 8 bytes, read the 8 back, close.
pub fn short_exchange(target: SocketAddr, i: u64) -> Result<()> {
    let mut s = connect(target)?;
    let mut msg = [b'E'; 9];
    msg[1..].copy_from_slice(&i.to_le_bytes());
    s.write_all(&msg)?;
    let mut back = [0u8; 8];
    s.read_exact(&mut back)?;
    ensure!(back == msg[1..], "echo differs");
    Ok(())
}

/// Opens `conns` connections, each checked end to end with a one-byte echo
/// (so the forwarder has its upstream side open too), prints a `ready`
/// line, and holds them until stdin has a line or closes.
pub fn idle(target: SocketAddr, conns: usize) -> Result<Value> {
    let start = Instant::now();
    let held = open_many(conns, move |i| -> Result<TcpStream> {
        let mut s = connect(target)?;
        s.write_all(b"E!")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .with_context(|| format!("no echo on held connection {i}"))?;
        Ok(s)
    })?;
    let secs = start.elapsed().as_secs_f64();
    ready_then_wait(&json!({"event": "ready", "conns": held.len(), "secs": secs}))?;
    drop(held);
    Ok(json!({"event": "done", "conns": conns, "open_secs": secs}))
}
