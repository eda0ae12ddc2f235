//! Watching splicer from outside, as an operator would: its `/metrics`
//! series and its log lines.
use std::{
    io::{ErrorKind, Read},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use splicer_testkit::metrics::scrape;

use crate::{free_port, show, v4, Proc, SPLICER_IP, STEP};

/// The value of one series, written exactly as `name{labels}`.
pub fn metric(text: &str, series: &str) -> Result<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .with_context(|| format!("no series {series} in:\n{text}"))?
        .trim()
        .parse()
        .with_context(|| format!("{series}: not a number"))
}

/// Scrapes `addr` and checks each series' value; returns the scrape. The
/// exposition must be complete (OpenMetrics' `# EOF` terminator).
pub fn expect_metrics(addr: SocketAddr, want: &[(&str, f64)]) -> Result<String> {
    let text = scrape(addr, STEP)?;
    ensure!(text.ends_with("# EOF\n"), "exposition not terminated:\n{text}");
    for (series, value) in want {
        let got = metric(&text, series)?;
        ensure!(got == *value, "{series} = {got}, want {value}\n{text}");
    }
    Ok(text)
}

/// Waits until the log has `n` lines containing `needle`.
pub fn wait_lines(p: &Proc, needle: &str, n: usize) -> Result<Vec<String>> {
    let deadline = Instant::now() + STEP;
    loop {
        let lines = p.lines_with(needle);
        if lines.len() >= n {
            return Ok(lines);
        }
        ensure!(Instant::now() < deadline, "want {n} lines with {needle:?}:\n{}", p.output());
        thread::sleep(Duration::from_millis(20));
    }
}

/// A client that splicer closes without forwarding: EOF or reset, and
/// nothing more.
pub fn expect_closed(s: &mut TcpStream, who: &str) -> Result<()> {
    s.set_read_timeout(Some(STEP))?;
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => Ok(()),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
        Ok(n) => bail!("{who}: got {n} bytes, expected a close: {}", show(&buf[..n])),
        Err(e) => bail!("{who}: expected a close, got {e}"),
    }
}

/// A free address for `--metrics`.
pub fn metrics_addr() -> SocketAddr {
    v4(SPLICER_IP, free_port(SPLICER_IP))
}

/// Waits until `pred` holds, or fails with `what`.
pub fn wait_for(what: &str, timeout: Duration, mut pred: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    while !pred()? {
        ensure!(std::time::Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
