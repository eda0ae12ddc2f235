//! Whole-machine figures: CPU time from /proc/stat, kernel memory from
//! /proc/slabinfo and /proc/net/sockstat, waiting for quiet, the open-files
//! limit, and a description of the machine for the report.
use std::{
    fs,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::Serialize;
use splicer_testkit::system::clk_tck;

/// (busy, total) CPU seconds over all CPUs since boot. Busy is everything
/// but idle and iowait.
fn cpu_times() -> (f64, f64) {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().sum();
    let idle = v.get(3).unwrap_or(&0.0) + v.get(4).unwrap_or(&0.0);
    ((total - idle) / clk_tck(), total / clk_tck())
}

/// Busy CPU seconds of the whole machine since boot.
pub fn busy_cpu_s() -> f64 {
    cpu_times().0
}

/// CPU seconds since boot of the kernel's own work: softirq and hardirq
/// time from /proc/stat, plus the on-CPU time of every kworker thread
/// (where the sockmap's psock backlog runs). Kworkers that exit during a
/// step take their time with them, so a difference can only under-count.
pub fn kernel_work_s() -> f64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let irq: f64 = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(6)
        .take(2)
        .filter_map(|x| x.parse::<f64>().ok())
        .sum();
    let mut kworker_ns = 0u64;
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let path = entry.path();
        let comm = fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !comm.starts_with("kworker") {
            continue;
        }
        let s = fs::read_to_string(path.join("schedstat")).unwrap_or_default();
        kworker_ns += s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    irq / clk_tck() + kworker_ns as f64 / 1e9
}

#[derive(Serialize, Clone, Copy, Default)]
pub struct Quiet {
    /// Idle fraction of the machine in the last half second before the step.
    pub idle: f64,
    /// How long the step waited for it.
    pub waited_s: f64,
}

/// Waits until the machine is at least 85% idle over half a second (other
/// work on a 2-core machine would show up in every figure), at most
/// `max_wait`; says what it saw.
pub fn wait_quiet(max_wait: Duration) -> Quiet {
    let start = Instant::now();
    loop {
        let (b0, t0) = cpu_times();
        thread::sleep(Duration::from_millis(500));
        let (b1, t1) = cpu_times();
        let idle = 1.0 - (b1 - b0) / (t1 - t0).max(1e-9);
        if idle >= 0.85 || start.elapsed() >= max_wait {
            return Quiet {
                idle,
                waited_s: start.elapsed().as_secs_f64(),
            };
        }
    }
}

/// Kernel memory that sockets use, in bytes: pages held by slab caches
/// (socket structs, inodes, dentries, files, epoll entries, BPF map
/// elements...) plus pages charged to TCP buffers. TIME_WAIT and
/// request socks are left out: earlier steps' TIME_WAITs expire while a step
/// runs, and would count against it.
pub fn kernel_mem_bytes() -> u64 {
    let page = 4096u64;
    let slab: u64 = fs::read_to_string("/proc/slabinfo")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter(|l| !l.starts_with("tw_sock_") && !l.starts_with("request_sock_"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // name active num objsize perslab pagesperslab : tunables x y z
            // : slabdata active_slabs num_slabs shared
            let pages_per_slab: u64 = f.get(5).and_then(|v| v.parse().ok()).unwrap_or(0);
            let slabs: u64 = f.get(14).and_then(|v| v.parse().ok()).unwrap_or(0);
            pages_per_slab * slabs * page
        })
        .sum();
    let tcp_pages: u64 = fs::read_to_string("/proc/net/sockstat")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            l.split_whitespace()
                .skip_while(|w| *w != "mem")
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    slab + tcp_pages * page
}

/// Raises this process's open-files limit towards `want` (soft and hard,
/// never lowering either), so the forwarders and the load generator, which
/// inherit it, can hold the idle workload's connections. Raising the hard
/// limit needs CAP_SYS_RESOURCE, which not every root has (containers drop
/// it): then the soft limit goes up to the hard one. Returns the limit in
/// force.
pub fn raise_nofile(want: u64) -> Result<u64> {
    let nr_open: u64 = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(want);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
        }
        let hard = lim.rlim_max;
        let n = want.min(nr_open).max(hard);
        lim.rlim_cur = n;
        lim.rlim_max = n;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
            return Ok(n);
        }
        lim.rlim_cur = hard;
        lim.rlim_max = hard;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
        }
        Ok(hard)
    }
}

#[derive(Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub haproxy: String,
    pub nginx: String,
    pub mosquitto: String,
}

pub fn machine() -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mem_kb: f64 = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    // Each prints its version on the first line of stdout or stderr.
    let version = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .output()
            .map(|o| {
                let all = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                // HAProxy adds " - <its web site>".
                let first = all.lines().next().unwrap_or("");
                first.split(" - ").next().unwrap_or("").trim().to_string()
            })
            .unwrap_or_else(|_| "not found".into())
    };
    Machine {
        cpu: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_default(),
        cores: thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        memory_gib: mem_kb / 1024.0 / 1024.0,
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        haproxy: version("haproxy", "-v"),
        nginx: version("nginx", "-v"),
        mosquitto: version("mosquitto", "-h"),
    }
}
