//! Upstreams by DNS name (issue 15), against dnsmasq on loopback serving a
//! hosts file the test rewrites: every address a name returns is an
//! upstream; addresses that appear or go join or leave the balancer
//! without touching live connections; a failed lookup keeps the last
//! answer (logged, counted); a name that does not resolve at start stops
//! splicer, naming it.
use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::Path,
    process::Command,
    thread,
    time::Duration,
};

use anyhow::{ensure, Result};
use splicer_testkit::metrics::scrape;
use splicer_tests::*;

const DNS_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 10);
const OTHER_BROKER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// dnsmasq answering from `hosts` only (TTL 1 s), re-read on SIGHUP.
fn dnsmasq(dir: &Path, hosts: &Path) -> Result<Proc> {
    let mut p = Proc::spawn(
        "dnsmasq",
        dir,
        Command::new("dnsmasq")
            .args(["--keep-in-foreground", "--port=53", "--bind-interfaces", "--no-resolv", "--no-hosts"])
            .args(["--local-ttl=1", "--user=root", "--log-queries", "--log-facility=-"])
            .arg(format!("--listen-address={DNS_IP}"))
            .arg(format!("--addn-hosts={}", hosts.display()))
            .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display())),
    )?;
    p.wait_line("started", STEP)?;
    Ok(p)
}

fn hup(p: &Proc) -> Result<()> {
    ensure!(Command::new("kill").args(["-HUP", &p.pid().to_string()]).status()?.success());
    Ok(())
}

/// A port free on both brokers' addresses (one name, one port).
fn common_port() -> u16 {
    loop {
        let p = free_port(BROKER_IP);
        if TcpListener::bind((OTHER_BROKER_IP, p)).is_ok() {
            return p;
        }
    }
}

/// One publish through splicer; the upstream that carried it.
fn publish(s: &Splicer, id: &str) -> Result<String> {
    let line = mosquitto_publish(s, id, "t/names")?;
    Ok(close_field(&line, "upstream").unwrap_or("?").to_string())
}

#[test]
fn a_name_gives_an_upstream_per_address_and_follows_its_changes() -> Result<()> {
    let dir = scratch("upstream-names");
    let port = common_port();
    let (b1, b2) = (v4(BROKER_IP, port), v4(OTHER_BROKER_IP, port));
    let _m1 = start_mosquitto(&dir.join("b1"), b1)?;
    let _m2 = start_mosquitto(&dir.join("b2"), b2)?;
    let hosts = dir.join("hosts");
    fs::write(&hosts, format!("{BROKER_IP} brokers.test\n{OTHER_BROKER_IP} brokers.test\n"))?;
    let mut dns = dnsmasq(&dir, &hosts)?;
    let resolv = dir.join("resolv.conf");
    fs::write(&resolv, format!("nameserver {DNS_IP}\n"))?;
    let listen = v4(SPLICER_IP, free_port(SPLICER_IP));
    let metrics = metrics_addr();
    let conf = dir.join("splicer.toml");
    fs::write(
        &conf,
        format!(
            "metrics = \"{metrics}\"\nresolv-conf = \"{}\"\nresolve-interval = \"500ms\"\n\
             [[listener]]\nlisten = \"{listen}\"\nupstream = [\"brokers.test:{port}\"]\n",
            resolv.display()
        ),
    )?;
    let mut cmd = Command::new(splicer_bin());
    cmd.arg("--config").arg(&conf);
    let s = Splicer::start_cmd(&dir, cmd, listen)?;
    let started = s.proc.lines_with("listening on").remove(0);
    ensure!(started.contains(&b1.to_string()) && started.contains(&b2.to_string()), "{started}");
    let ups: Vec<String> = (0..4).map(|i| publish(&s, &format!("n{i}"))).collect::<Result<_>>()?;
    ensure!(ups.contains(&b1.to_string()) && ups.contains(&b2.to_string()), "both addresses should take clients: {ups:?}");

    // A subscriber on one of them, then the name loses 127.0.0.6.
    let mut sub = Proc::spawn_apart(
        "sub",
        &dir,
        Command::new("mosquitto_sub")
            .args(["-h", &listen.ip().to_string(), "-p", &listen.port().to_string()])
            .args(["-A", &CLIENT_IP.to_string(), "-i", "names-sub", "-t", "t/live", "-C", "1"]),
    )?;
    thread::sleep(Duration::from_millis(300));
    fs::write(&hosts, format!("{BROKER_IP} brokers.test\n"))?;
    hup(&dns)?;
    wait_for("the gone address leaves", STEP, || {
        Ok(s.proc.lines_with("reloaded: ").iter().any(|l| !l.contains(&b2.to_string())))
    })?;
    let ups: Vec<String> = (4..8).map(|i| publish(&s, &format!("n{i}"))).collect::<Result<_>>()?;
    ensure!(ups.iter().all(|u| *u == b1.to_string()), "only {b1} should take clients now: {ups:?}");
    // The subscriber's connection, on whichever broker, is untouched.
    for b in [b1, b2] {
        let (st, out, err) = run_with_timeout(
            Command::new("mosquitto_pub")
                .args(["-h", &b.ip().to_string(), "-p", &b.port().to_string(), "-t", "t/live", "-m", "still"]),
            STEP,
        )?;
        ensure!(st.success(), "{out}{err}");
    }
    ensure!(sub.wait_exit(STEP)?.success() && sub.output() == "still\n", "subscriber: {:?} {}", sub.output(), sub.stderr());

    // The address comes back: it joins again.
    fs::write(&hosts, format!("{BROKER_IP} brokers.test\n{OTHER_BROKER_IP} brokers.test\n"))?;
    hup(&dns)?;
    wait_for("the address joins again", STEP, || {
        Ok(s.proc.lines_with("reloaded: ").last().is_some_and(|l| l.contains(&b2.to_string())))
    })?;
    let ups: Vec<String> = (8..12).map(|i| publish(&s, &format!("n{i}"))).collect::<Result<_>>()?;
    ensure!(ups.contains(&b2.to_string()), "{b2} should take clients again: {ups:?}");

    // The DNS server goes: the last answer stays, the failure is counted.
    dns.stop();
    wait_for("a failed lookup is logged", STEP, || Ok(!s.proc.lines_with("keeping its last answer").is_empty()))?;
    let body = scrape(metrics, STEP)?;
    let failures = metric(&body, &format!("splicer_dns_failures_total{{name=\"brokers.test:{port}\"}}"))?;
    ensure!(failures >= 1.0, "{body}");
    let ups: Vec<String> = (12..16).map(|i| publish(&s, &format!("n{i}"))).collect::<Result<_>>()?;
    ensure!(ups.contains(&b1.to_string()) && ups.contains(&b2.to_string()), "the last answer should stay: {ups:?}");
    Ok(())
}

#[test]
fn a_name_that_does_not_resolve_at_start_stops_splicer() -> Result<()> {
    let dir = scratch("upstream-names-bad");
    let hosts = dir.join("hosts");
    fs::write(&hosts, format!("{BROKER_IP} brokers.test\n"))?;
    let _dns = dnsmasq(&dir, &hosts)?;
    let resolv = dir.join("resolv.conf");
    fs::write(&resolv, format!("nameserver {DNS_IP}\noptions timeout:1 attempts:1\n"))?;
    let listen: SocketAddr = v4(SPLICER_IP, free_port(SPLICER_IP));
    let (st, out, err) = run_with_timeout(
        Command::new(splicer_bin())
            .args(["--listen", &listen.to_string(), "--upstream", "nosuch.test:1883"])
            .arg("--resolv-conf")
            .arg(&resolv),
        STEP,
    )?;
    ensure!(!st.success(), "splicer started with a name that does not resolve:\n{out}{err}");
    ensure!(err.contains("nosuch.test:1883"), "the error should name it:\n{err}");
    Ok(())
}
