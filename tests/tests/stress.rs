//! Every byte arrives, in order, exactly once: many concurrent connections
//! of random sizes, with half-closes at random points, in both offload modes.
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use anyhow::{bail, Result};
use splicer_tests::*;

const CONNECTIONS: usize = 500;
const PARALLEL: usize = 16;
const MAX_BYTES: u64 = 16 << 20;

/// Tiny deterministic RNG for choosing sizes and timings.
fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Log-uniform in [0, MAX_BYTES]: mostly small, sometimes the full 16 MiB.
fn size(rng: &mut u64) -> u64 {
    let u = (splitmix(rng) >> 11) as f64 / (1u64 << 53) as f64;
    ((MAX_BYTES as f64 + 1.0).powf(u) - 1.0) as u64
}

/// What one connection does: sizes each way and when each side half-closes.
#[derive(Clone, Copy, Debug)]
struct Plan {
    seed: u64,
    up: u64,
    down: u64,
    /// The server waits for the client's EOF before sending (else sends at once).
    server_waits: bool,
    /// The client reads everything before sending (else sends at once).
    client_waits: bool,
}

impl Plan {
    fn new(i: u64) -> Plan {
        let mut rng = i.wrapping_mul(7919) ^ 0xC0FFEE;
        let (up, down) = (size(&mut rng), size(&mut rng));
        let r = splitmix(&mut rng) % 4;
        // Never both waiting for the other: that would deadlock by design.
        Plan {
            seed: i,
            up,
            down,
            server_waits: r == 1,
            client_waits: r == 2,
        }
    }

    /// 32-byte preamble the client sends first so the server knows the plan.
    fn preamble(&self) -> [u8; 32] {
        let mut p = [0u8; 32];
        p[..8].copy_from_slice(&self.seed.to_le_bytes());
        p[8..16].copy_from_slice(&self.up.to_le_bytes());
        p[16..24].copy_from_slice(&self.down.to_le_bytes());
        p[24] = self.server_waits as u8;
        p
    }
}

/// The upstream: checks the PROXY header, then plays its side of the plan.
fn serve_one(mut s: TcpStream, errors: Arc<Mutex<Vec<String>>>, listen: SocketAddr) {
    let result = (|| -> Result<()> {
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let header = read_proxy_header(&mut s)?;
        let mut pre = [0u8; 32];
        s.read_exact(&mut pre)?;
        let seed = u64::from_le_bytes(pre[..8].try_into()?);
        let up = u64::from_le_bytes(pre[8..16].try_into()?);
        let down = u64::from_le_bytes(pre[16..24].try_into()?);
        // The header must name the client's address and splicer's listener.
        if !header.starts_with(b"\r\n\r\n\0\r\nQUIT\n") || header.len() != 28 {
            bail!("seed {seed}: not a v2 IPv4 header: {header:?}");
        }
        if header[20..24]
            != listen
                .ip()
                .to_string()
                .parse::<std::net::Ipv4Addr>()?
                .octets()
            || header[26..28] != listen.port().to_be_bytes()
            || header[16..20] != CLIENT_IP.octets()
        {
            bail!("seed {seed}: wrong addresses in header {header:?}");
        }
        let mut w = s.try_clone()?;
        let mut writer = move || -> Result<()> {
            send_pattern(&mut w, seed ^ 0xD0D0, down)?;
            w.shutdown(Shutdown::Write)?;
            Ok(())
        };
        if pre[24] == 1 {
            expect_pattern(&mut s, seed, up)?;
            writer()?;
        } else {
            let t = thread::spawn(writer);
            expect_pattern(&mut s, seed, up)?;
            t.join().unwrap()?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        errors.lock().unwrap().push(format!("server: {e:#}"));
    }
}

/// `behind_lb`: the client plays a trusted load balancer and sends a PROXY
/// header (naming itself) right before its data, in the same burst.
fn client_one(to: SocketAddr, plan: Plan, behind_lb: bool) -> Result<()> {
    let mut s = connect_from_client(to)?;
    if behind_lb {
        s.write_all(&expected_v1(s.local_addr()?, to))?;
    }
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut w = s.try_clone()?;
    let writer = move || -> Result<()> {
        w.write_all(&plan.preamble())?;
        send_pattern(&mut w, plan.seed, plan.up)?;
        w.shutdown(Shutdown::Write)?;
        Ok(())
    };
    if plan.client_waits {
        // Preamble first, or the server cannot know the plan.
        let mut w0 = s.try_clone()?;
        w0.write_all(&plan.preamble())?;
        expect_pattern(&mut s, plan.seed ^ 0xD0D0, plan.down)?;
        send_pattern(&mut w0, plan.seed, plan.up)?;
        w0.shutdown(Shutdown::Write)?;
    } else {
        let t = thread::spawn(writer);
        expect_pattern(&mut s, plan.seed ^ 0xD0D0, plan.down)?;
        t.join().unwrap()?;
    }
    Ok(())
}

fn stress(mode: &str, behind_lb: bool) -> Result<()> {
    let dir = scratch(&format!("stress-{mode}-{behind_lb}"));
    let (listener, upstream) = listen_on(BROKER_IP)?;
    let mut args = vec!["--send-proxy", "v2"];
    if behind_lb {
        args.extend(["--accept-proxy", "v1", "--trusted-proxy", "127.0.0.2/32"]);
    }
    let splicer = splicer_in_mode(&dir, mode, upstream, &args)?;
    let errors = Arc::new(Mutex::new(Vec::new()));
    let listen = splicer.listen;
    {
        let errors = errors.clone();
        thread::spawn(move || accept_loop(listener, errors, listen));
    }
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..PARALLEL)
        .map(|_| {
            let (next, errors) = (next.clone(), errors.clone());
            thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= CONNECTIONS {
                    return;
                }
                let plan = Plan::new(i as u64);
                if let Err(e) = client_one(listen, plan, behind_lb) {
                    errors
                        .lock()
                        .unwrap()
                        .push(format!("client {plan:?}: {e:#}"));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let closed = splicer.wait_closed(CONNECTIONS, Duration::from_secs(30))?;
    let errors = errors.lock().unwrap();
    if !errors.is_empty() {
        bail!(
            "{} of {CONNECTIONS} connections failed in {mode} mode; first: {:?}",
            errors.len(),
            &errors[..errors.len().min(5)]
        );
    }
    // splicer's own accounting agrees with what was sent, both ways.
    let total: (u64, u64) = (0..CONNECTIONS as u64)
        .map(Plan::new)
        .fold((0, 0), |(u, d), p| (u + 32 + p.up, d + p.down));
    let logged = closed.iter().fold((0u64, 0u64), |(u, d), l| {
        let f = |k: &str| {
            l.split(k)
                .nth(1)
                .and_then(|v| v.split(' ').next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        (u + f("client_to_upstream="), d + f("upstream_to_client="))
    });
    assert_eq!(
        logged, total,
        "bytes in splicer's close lines vs bytes sent ({mode})"
    );
    let ends: Vec<_> = closed
        .iter()
        .filter(|l| l.contains("reset") || l.contains("error"))
        .collect();
    assert!(
        ends.is_empty(),
        "connections that did not close cleanly: {ends:?}"
    );
    eprintln!(
        "{mode}: {CONNECTIONS} connections, {} MiB up, {} MiB down, all verified",
        total.0 >> 20,
        total.1 >> 20
    );
    Ok(())
}

fn accept_loop(listener: TcpListener, errors: Arc<Mutex<Vec<String>>>, listen: SocketAddr) {
    for s in listener.incoming() {
        let Ok(s) = s else { return };
        let errors = errors.clone();
        thread::spawn(move || serve_one(s, errors, listen));
    }
}

#[test]
fn stress_sockmap() -> Result<()> {
    stress("sockmap", false)
}

#[test]
fn stress_userspace() -> Result<()> {
    stress("userspace", false)
}

/// The same, with every connection opening with a PROXY header that splicer
/// must consume, so the handoff happens with the client's data already queued.
#[test]
fn stress_sockmap_behind_lb() -> Result<()> {
    stress("sockmap", true)
}

#[test]
fn stress_userspace_behind_lb() -> Result<()> {
    stress("userspace", true)
}
