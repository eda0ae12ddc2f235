//! What /proc says about a forwarder with all its processes (nginx's
//! workers, say): CPU time and resident memory. Starting and stopping the
//! processes is splicer_testkit's `Proc`.
use std::fs;

/// `pid` and all its descendants (nginx's workers, say).
pub fn tree(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        // The field after the ")" that closes the command name is the
        // state, then the parent's PID.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((p, ppid));
        }
    }
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        all.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    all
}

/// CPU time of the tree in seconds: every thread's on-CPU time from
/// /proc/PID/task/TID/schedstat. That is the clock utime+stime come from,
/// in nanoseconds rather than 10 ms ticks, which matters when a forwarder
/// uses a few milliseconds per gigabyte.
pub fn tree_cpu_s(pid: u32) -> f64 {
    let mut ns = 0u64;
    for p in tree(pid) {
        for task in fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let s = fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            ns += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ns as f64 / 1e9
}

/// Resident memory of the tree in bytes (VmRSS of each process).
pub fn tree_rss_bytes(pid: u32) -> u64 {
    tree(pid)
        .iter()
        .map(|p| {
            fs::read_to_string(format!("/proc/{p}/status"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        })
        .sum()
}
