//! Child processes: a background one whose output goes to a log file
//! (`Proc`, stopped by PID on drop) and is waited on by polling, and a
//! command run to completion with a deadline (`run_with_timeout`).
use std::{
    fs,
    io::Read,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{net::is_listening, system::clk_tck};

/// A child process whose output goes to a log file; stopped (SIGTERM, then
/// SIGKILL) on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    /// stdout and stderr, or only stdout if `err` is set.
    pub log: PathBuf,
    /// stderr, when it is kept apart from stdout.
    pub err: Option<PathBuf>,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr in `dir/<name>.log`.
    pub fn spawn(name: &str, dir: &Path, cmd: &mut Command) -> Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let out = fs::File::create(&log)?;
        let child = start(name, cmd.stdout(out.try_clone()?).stderr(out))?;
        Ok(Proc {
            name: name.into(),
            child,
            log,
            err: None,
        })
    }

    /// Starts `cmd` with stdout in `dir/<name>.stdout` and stderr apart in
    /// `dir/<name>.stderr`, for a peer whose stdout is compared exactly.
    pub fn spawn_apart(name: &str, dir: &Path, cmd: &mut Command) -> Result<Proc> {
        let log = dir.join(format!("{name}.stdout"));
        let err = dir.join(format!("{name}.stderr"));
        let cmd = cmd
            .stdout(fs::File::create(&log)?)
            .stderr(fs::File::create(&err)?);
        Ok(Proc {
            name: name.into(),
            child: start(name, cmd)?,
            log,
            err: Some(err),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log so far (stdout only, if stderr is kept apart).
    pub fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// stderr so far, if kept apart (else it is in `output`).
    pub fn stderr(&self) -> String {
        self.err
            .as_ref()
            .and_then(|e| fs::read_to_string(e).ok())
            .unwrap_or_default()
    }

    /// All it printed, for an error message.
    fn printed(&self) -> String {
        match self.err {
            Some(_) => format!("stdout:\n{}stderr:\n{}", self.output(), self.stderr()),
            None => self.output(),
        }
    }

    /// Polls `ready` every 20 ms until it gives a value; fails, with what
    /// the process printed, once `timeout` passes or if the process exits
    /// first (after a last look). `what` names what is waited for.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut(&mut Proc) -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = ready(self)? {
                return Ok(v);
            }
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "{} exited ({st}) before {what}:\n{}",
                    self.name,
                    self.printed()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: no {what} within {timeout:?}:\n{}",
                    self.name,
                    self.printed()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the log has a line containing `needle`; returns it.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        self.wait_for(&format!("line with {needle:?}"), timeout, |p| {
            Ok(p.lines_with(needle).into_iter().next())
        })
    }

    /// Complete lines of the log that contain `needle`. A line still being
    /// written is left out: a read of the file can see half of a write(2).
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        let out = self.output();
        let complete = out.rfind('\n').map_or("", |i| &out[..=i]);
        complete
            .lines()
            .filter(|l| l.contains(needle))
            .map(String::from)
            .collect()
    }

    /// Waits until something LISTENs on `addr`, without connecting (see
    /// `is_listening`).
    pub fn wait_listening(&mut self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        self.wait_for(&format!("listener on {addr}"), timeout, |_| {
            Ok(is_listening(addr).then_some(()))
        })
    }

    /// Waits for the process to exit by itself; its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.wait_for("exit", timeout, |p| Ok(p.child.try_wait()?))
    }

    /// Fails (with its log) if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("{} exited ({st}):\n{}", self.name, self.printed());
        }
        Ok(())
    }

    /// Sends `sig` (e.g. SIGHUP for a reload); whether kill(2) succeeded.
    pub fn signal(&self, sig: i32) -> bool {
        // SAFETY: plain kill(2) on our own child's PID.
        unsafe { libc::kill(self.child.id() as i32, sig) == 0 }
    }

    /// SIGTERM, then SIGKILL after 5 s; returns the exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if let Ok(Some(s)) = self.child.try_wait() {
            return Some(s);
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }

    /// utime + stime of the process, in seconds (from /proc/PID/stat).
    pub fn cpu_seconds(&self) -> f64 {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the ")" that closes the command name; utime and
        // stime are fields 14 and 15 of the whole line.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        ticks / clk_tck()
    }

    /// Number of open file descriptors.
    pub fn fd_count(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn start(name: &str, cmd: &mut Command) -> Result<Child> {
    cmd.stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {name}: {cmd:?}"))
}

/// Runs a command to completion, killed after `timeout`; returns (status,
/// stdout, stderr). Polls every 5 ms, so a caller that times the command
/// (the bench's wall clock) is off by no more than that.
pub fn run_with_timeout(
    cmd: &mut Command,
    timeout: Duration,
) -> Result<(ExitStatus, String, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    // Both pipes are drained while it runs, or a chatty child would block.
    let out = read_in_background(child.stdout.take().unwrap());
    let err = read_in_background(child.stderr.take().unwrap());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} timed out after {timeout:?}");
        }
        thread::sleep(Duration::from_millis(5));
    };
    Ok((
        status,
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    ))
}

/// Reads `r` to its end on a thread of its own; join for the text.
pub fn read_in_background(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn waits_for_lines_and_exits() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("splicer-testkit-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let t = Duration::from_secs(5);

        let mut p = Proc::spawn("both", &dir, &mut sh("echo out; echo err >&2; sleep 30"))?;
        p.wait_line("err", t)?;
        assert_eq!(p.lines_with("out"), ["out"]);
        assert!(
            p.stop().is_some_and(|st| !st.success()),
            "not stopped by a signal"
        );

        let mut p = Proc::spawn_apart("apart", &dir, &mut sh("echo out; echo err >&2"))?;
        assert!(p.wait_exit(t)?.success());
        assert_eq!((p.output(), p.stderr()), ("out\n".into(), "err\n".into()));
        let e = p.wait_line("never", t).unwrap_err().to_string();
        assert!(e.contains("exited") && e.contains("stderr:\nerr"), "{e}");

        let (st, out, err) = run_with_timeout(&mut sh("echo out; echo err >&2; exit 3"), t)?;
        assert_eq!(
            (st.code(), out.as_str(), err.as_str()),
            (Some(3), "out\n", "err\n")
        );
        assert!(run_with_timeout(&mut sh("sleep 30"), Duration::from_millis(100)).is_err());
        fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
