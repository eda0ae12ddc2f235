//! Child processes (forwarders, brokers, the load generator's server) and
//! what /proc says about a process and its descendants.
use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// A background process whose output goes to a log file; stopped on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, dir: &Path, cmd: &mut Command) -> Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let out = fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        Ok(Proc {
            name: name.into(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until something LISTENs on `addr`; fails if the process exits
    /// first or takes longer than 10 s.
    pub fn wait_listening(&mut self, addr: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_listening(addr) {
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "{} exited ({st}) before listening on {addr}:\n{}",
                    self.name,
                    self.output()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} does not listen on {addr}:\n{}",
                    self.name,
                    self.output()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Fails (with its log) if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("{} exited ({st}):\n{}", self.name, self.output());
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: kill(2) on our own child's PID, which we have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether something LISTENs on `addr`, from /proc/net/tcp (connecting to
/// find out would send a connection through a forwarder).
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
