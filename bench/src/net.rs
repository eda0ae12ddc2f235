//! Client sockets and the small statistics every workload shares.
use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result};

/// Clients connect from 127.0.1.10 to 127.0.1.13 in turn: each source
/// address has its own ephemeral port range, so tens of thousands of held
/// connections (and the TIME_WAITs of short ones) never run out of ports.
const CLIENT_IPS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(127, 0, 1, 10),
    Ipv4Addr::new(127, 0, 1, 11),
    Ipv4Addr::new(127, 0, 1, 12),
    Ipv4Addr::new(127, 0, 1, 13),
];

/// A connection to `to` from the next client address, Nagle off (the
/// exchanges are small and latency is measured).
pub fn connect(to: SocketAddr) -> Result<TcpStream> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let from = CLIENT_IPS[NEXT.fetch_add(1, Ordering::Relaxed) % CLIENT_IPS.len()];
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    // Pick the port at connect() time, by the whole 4-tuple, rather than at
    // bind() time, where every port in TIME_WAIT would count as taken.
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on our own socket with a c_int option value.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    sock.bind(&SocketAddr::from((from, 0)).into())?;
    sock.connect_timeout(&to.into(), Duration::from_secs(10))
        .with_context(|| format!("connect {from} -> {to}"))?;
    sock.set_nodelay(true)?;
    let s: TcpStream = sock.into();
    // A forwarder that loses a connection must fail the run, not hang it.
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    Ok(s)
}

/// The value at quantile `q` (0..=1) of `v`, which this sorts.
pub fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Opens `n` connections with `open(i)` from 8 threads at once (a
/// forwarder's accept loop, not the client, should set the pace), in order
/// of `i`.
pub fn open_many<T: Send + 'static>(
    n: usize,
    open: impl Fn(usize) -> Result<T> + Send + Sync + 'static,
) -> Result<Vec<T>> {
    const THREADS: usize = 8;
    let open = std::sync::Arc::new(open);
    let openers: Vec<_> = (0..THREADS)
        .map(|t| {
            let open = open.clone();
            std::thread::spawn(move || -> Result<Vec<T>> {
                (t..n).step_by(THREADS).map(|i| open(i)).collect()
            })
        })
        .collect();
    let mut per_thread = Vec::with_capacity(THREADS);
    for o in openers {
        per_thread.push(o.join().expect("opener thread panicked")?.into_iter());
    }
    // Interleave back into the order of i.
    let mut all = Vec::with_capacity(n);
    for i in 0..n {
        all.push(per_thread[i % THREADS].next().expect("one per i"));
    }
    Ok(all)
}

/// Prints `ready` (a JSON line) and blocks until a line (or EOF) on stdin:
/// how xtask lets a workload's set-up happen outside its measurement.
pub fn ready_then_wait(ready: &serde_json::Value) -> Result<()> {
    use std::io::{BufRead, Write};
    println!("{ready}");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(())
}
