//! Loading the eBPF object and operating its maps: which socket redirects to
//! which, and the per-socket byte counters the verdict program keeps.
// aya's ring buffers and logger are registered with tokio's AsyncFd, which
// is unsafe because it trusts the fd to stay open and unchanged; each site
// says why it does.
#![allow(unsafe_code)]
use std::{
    os::fd::AsRawFd,
    sync::{Mutex, MutexGuard},
};

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{HashMap, MapData, RingBuf, SockHash},
    programs::SkSkb,
    Ebpf, EbpfLoader,
};
use super::layout::Layout;
use proxy_common::{
    Link, MAP_EVENTS, MAP_LIMITS, MAP_LINKS, MAP_SPLICED, MAP_TARGETS, PROG_VERDICT,
};

/// The object `cargo xtask build` compiled; empty if built without it.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf.o"));

pub struct Maps {
    links: Mutex<HashMap<MapData, u64, Link>>,
    limits: Mutex<HashMap<MapData, u64, u64>>,
    targets: Mutex<SockHash<MapData, u64>>,
    spliced: Mutex<SockHash<MapData, u64>>,
    pub prog_id: u32,
    /// Keeps the program (and its attachment to SPLICED) alive.
    _ebpf: Ebpf,
}

impl Maps {
    /// Loads and attaches the verdict program, and forwards its aya-log
    /// records into our logger at `level`. `Events` is the program's
    /// flow-control signals, for the caller to dispatch.
    pub fn load(level: log::LevelFilter) -> Result<(Maps, Events)> {
        if EBPF_OBJECT.is_empty() {
            return Err(anyhow!(
                "this binary was built without the eBPF object (build it with `cargo xtask build`)"
            ));
        }
        raise_memlock_limit();
        // The kernel side skips records above this level, so debug lines
        // cost nothing per packet at info.
        let ebpf_level: u8 = match level.to_level() {
            None => 0,
            Some(log::Level::Error) => aya_log::Level::Error as u8,
            Some(log::Level::Warn) => aya_log::Level::Warn as u8,
            Some(log::Level::Info) => aya_log::Level::Info as u8,
            Some(log::Level::Debug) => aya_log::Level::Debug as u8,
            Some(log::Level::Trace) => aya_log::Level::Trace as u8,
        };
        let layout = Layout::of_running_kernel()
            .context("the verdict program needs two offsets from the kernel's BTF")?;
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &ebpf_level, false)
            .override_global("SKB_SEQ_OFFSET", &layout.skb_seq, true)
            .override_global("TCP_COPIED_SEQ_OFFSET", &layout.tcp_copied_seq, true)
            .load(EBPF_OBJECT)
            .map_err(explain_load_error)?;
        start_kernel_logger(&mut ebpf);
        let links: HashMap<MapData, u64, Link> = take(&mut ebpf, MAP_LINKS)?.try_into()?;
        let targets: SockHash<MapData, u64> = take(&mut ebpf, MAP_TARGETS)?.try_into()?;
        let spliced: SockHash<MapData, u64> = take(&mut ebpf, MAP_SPLICED)?.try_into()?;
        let limits: HashMap<MapData, u64, u64> = take(&mut ebpf, MAP_LIMITS)?.try_into()?;
        let events = Events(take(&mut ebpf, MAP_EVENTS)?.try_into()?);
        let prog: &mut SkSkb = ebpf
            .program_mut(PROG_VERDICT)
            .ok_or_else(|| anyhow!("program {PROG_VERDICT} missing from the eBPF object"))?
            .try_into()?;
        prog.load().map_err(|e| {
            explain_load_error(aya::EbpfError::ProgramError(e))
                .context("loading the sk_skb verdict program")
        })?;
        prog.attach(spliced.fd())
            .context("attaching the verdict program to the SPLICED sockhash")?;
        let prog_id = prog.info().map_or(0, |i| i.id());
        let maps = Maps {
            links: Mutex::new(links),
            limits: Mutex::new(limits),
            targets: Mutex::new(targets),
            spliced: Mutex::new(spliced),
            prog_id,
            _ebpf: ebpf,
        };
        Ok((maps, events))
    }

    /// `token` is the connection's handle in park.rs, reported on EVENTS.
    pub fn set_link(&self, cookie: u64, peer: u64, token: u64) -> Result<()> {
        let link = Link {
            peer,
            token,
            ..Link::default()
        };
        let inserted = lock(&self.links).insert(cookie, link, 0);
        inserted.context("LINKS insert")
    }

    pub fn link(&self, cookie: u64) -> Option<Link> {
        lock(&self.links).get(&cookie, 0).ok()
    }

    pub fn remove_link(&self, cookie: u64) {
        let _ = lock(&self.links).remove(&cookie);
    }

    /// Makes the socket a redirect target. Fails unless it is ESTABLISHED.
    pub fn add_target(&self, cookie: u64, fd: &impl AsRawFd) -> Result<()> {
        let inserted = lock(&self.targets).insert(cookie, fd.as_raw_fd(), 0);
        inserted.context("TARGETS insert")
    }

    pub fn remove_target(&self, cookie: u64) {
        let _ = lock(&self.targets).remove(&cookie);
    }

    /// Hands the socket's ingress to the verdict program. Fails unless the
    /// socket is ESTABLISHED (so not after the peer's FIN).
    pub fn add_spliced(&self, cookie: u64, fd: &impl AsRawFd) -> Result<()> {
        let inserted = lock(&self.spliced).insert(cookie, fd.as_raw_fd(), 0);
        inserted.context("SPLICED insert")
    }

    /// Asks the program to signal `cookie` once its redirected bytes reach `limit`.
    pub fn set_limit(&self, cookie: u64, limit: u64) -> Result<()> {
        let inserted = lock(&self.limits).insert(cookie, limit, 0);
        inserted.context("LIMITS insert")
    }

    /// Where the program signals `cookie` next.
    pub fn limit(&self, cookie: u64) -> Option<u64> {
        lock(&self.limits).get(&cookie, 0).ok()
    }

    pub fn remove_limit(&self, cookie: u64) {
        let _ = lock(&self.limits).remove(&cookie);
    }
}

/// A map's lock. Each map has its own, so a scrape reading LINKS does not
/// hold up handoffs writing TARGETS; none is held across an await.
fn lock<T>(map: &Mutex<T>) -> MutexGuard<'_, T> {
    map.lock().unwrap()
}

/// The verdict program's flow-control signals: the token (Link.token) of
/// each connection whose redirected bytes reached their limit.
pub struct Events(RingBuf<MapData>);

impl Events {
    /// Reads tokens off the EVENTS ring buffer for good, calling `wake`
    /// with each.
    pub fn dispatch(self, wake: impl Fn(u64) + Send + 'static) -> Result<()> {
        // SAFETY: the ring buffer owns its fd and keeps it open and
        // unchanged for as long as the AsyncFd holds it.
        let mut events = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(self.0, tokio::io::Interest::READABLE)
        }
        .map_err(|e| anyhow!("watching the EVENTS ring buffer: {e}"))?;
        tokio::spawn(async move {
            loop {
                let Ok(mut guard) = events.readable_mut().await else {
                    return;
                };
                while let Some(item) = guard.get_inner_mut().next() {
                    if let Ok(bytes) = <[u8; 8]>::try_from(&*item) {
                        wake(u64::from_ne_bytes(bytes));
                    }
                }
                guard.clear_ready();
            }
        });
        Ok(())
    }
}

fn take(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

/// Turns the usual load failures into a reason an operator can act on.
fn explain_load_error(e: aya::EbpfError) -> anyhow::Error {
    // Name the capability that is missing: CAP_BPF for any map or program,
    // CAP_NET_ADMIN for the sockhash maps and the sk_skb program,
    // CAP_PERFMON for the verdict's reads of kernel memory (see
    // `already_delivered` in proxy-ebpf; without it the verifier refuses
    // the helper). CAP_SYS_ADMIN (21) stands in for all three.
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    const GRANT: &str = "run as root, or grant CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON";
    // aya's Display leaves out the OS error; collect the whole chain.
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let s_text = s.to_string();
        // aya repeats a message one level down ("failed to create map `X`").
        if !text.ends_with(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    let eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        });
    let missing: Vec<&str> = match eff {
        Some(eff) if eff & (1 << CAP_SYS_ADMIN) == 0 => {
            [(CAP_BPF, "CAP_BPF"), (CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_PERFMON, "CAP_PERFMON")]
                .into_iter()
                .filter(|&(bit, _)| eff & (1 << bit) == 0)
                .map(|(_, name)| name)
                .collect()
        }
        _ => Vec::new(),
    };
    if !missing.is_empty() || text.contains("Operation not permitted") || text.contains("Permission denied") {
        let why = match eff {
            None => GRANT.to_string(),
            Some(_) if missing.is_empty() => "the process has the capabilities eBPF needs, so a \
                 security module, seccomp filter or user namespace is refusing bpf()"
                .to_string(),
            Some(_) => format!(
                "missing {}; {GRANT} (AmbientCapabilities= in dist/splicer.service)",
                missing.join(" and ")
            ),
        };
        anyhow!("permission denied loading eBPF ({why}): {text}")
    } else {
        anyhow!("loading eBPF failed (kernel without BPF sockmap/sk_skb support?): {text}")
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const rlim) } != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Copies the kernel program's aya-log records into splicer's own log.
fn start_kernel_logger(ebpf: &mut Ebpf) {
    match aya_log::EbpfLogger::init(ebpf) {
        Err(e) => log::warn!("eBPF log forwarding unavailable: {e}"),
        Ok(logger) => {
            // SAFETY: the logger owns its ring buffer fd and keeps it open
            // and unchanged for as long as the AsyncFd holds the logger.
            let registered = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    logger,
                    tokio::io::Interest::READABLE,
                )
            };
            let mut logger = match registered {
                Ok(l) => l,
                Err(e) => return log::warn!("eBPF log forwarding unavailable: {e}"),
            };
            tokio::spawn(async move {
                loop {
                    let Ok(mut guard) = logger.readable_mut().await else {
                        return;
                    };
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }
    }
}
