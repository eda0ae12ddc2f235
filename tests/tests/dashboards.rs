//! What ships for monitoring (issue 15): `dist/prometheus/splicer-rules.yml`
//! passes `promtool check rules` and its own `promtool test rules` file, and
//! every metric the rules and `dist/grafana/splicer.json` query is one a
//! running splicer exports.
use std::{collections::BTreeSet, path::PathBuf, process::Command};

use anyhow::{ensure, Context as _, Result};
use splicer_testkit::metrics::scrape;
use splicer_tests::*;

fn dist() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dist")
}

fn promtool(args: &[&str]) -> Result<String> {
    let (st, out, err) = run_with_timeout(Command::new("promtool").args(args).current_dir(dist().join("prometheus")), STEP)?;
    ensure!(st.success(), "promtool {args:?}: {st}\n{out}{err}");
    Ok(out)
}

#[test]
fn the_alert_rules_check_and_pass_their_tests() -> Result<()> {
    let out = promtool(&["check", "rules", "splicer-rules.yml"])?;
    ensure!(out.contains("SUCCESS"), "{out}");
    let out = promtool(&["test", "rules", "splicer-rules.test.yml"])?;
    ensure!(out.contains("SUCCESS"), "{out}");
    Ok(())
}

/// The `splicer_…` names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("splicer_") {
        let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        rest = &rest[i + name.len()..];
        out.push(name);
    }
    out
}

#[test]
fn the_dashboard_and_rules_query_only_exported_metrics() -> Result<()> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dist().join("grafana/splicer.json"))?).context("dashboard JSON")?;
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().context("panels")? {
        for target in panel["targets"].as_array().context("targets")? {
            used.extend(metric_names(target["expr"].as_str().context("expr")?));
        }
    }
    ensure!(used.len() >= 15, "the dashboard queries only {used:?}");
    let rules = std::fs::read_to_string(dist().join("prometheus/splicer-rules.yml"))?;
    for line in rules.lines().filter(|l| l.trim_start().starts_with("expr:")) {
        used.extend(metric_names(line));
    }
    // A listener of each kind (a family shows once it has a series), and
    // one reload.
    let dir = scratch("dashboards");
    let pki = Pki::new(&dir, "ca")?;
    let (cert, key) = pki.server("broker.test", 2)?;
    let metrics = metrics_addr();
    let (_sink, up) = listen_on(BROKER_IP)?;
    let listen = |name: &str, keys: &str| {
        format!("[[listener]]\nname = \"{name}\"\nlisten = \"{}\"\nupstream = [\"{up}\"]\n{keys}\n", v4(SPLICER_IP, free_port(SPLICER_IP)))
    };
    let first = v4(SPLICER_IP, free_port(SPLICER_IP));
    let config = format!(
        "metrics = \"{metrics}\"\n[[listener]]\nname = \"tcp\"\nlisten = \"{first}\"\nupstream = [\"{up}\"]\n{}{}{}",
        listen("mqtt", "protocol = \"mqtt\""),
        listen("pass", "protocol = \"tls-passthrough\""),
        listen("mqtts", &format!("protocol = \"mqtt\"\ntls-cert = \"{}\"\ntls-key = \"{}\"", cert.display(), key.display())),
    );
    let path = dir.join("splicer.toml");
    std::fs::write(&path, config)?;
    let mut cmd = Command::new(splicer_bin());
    cmd.arg("--config").arg(&path);
    let s = Splicer::start_cmd(&dir, cmd, first)?;
    let st = Command::new("kill").args(["-HUP", &s.proc.pid().to_string()]).status()?;
    ensure!(st.success());
    wait_lines(&s.proc, "reload: ", 1)?;
    let body = scrape(metrics, STEP)?;
    drop(s);
    // The names of the series themselves (`_total`, `_bucket` included):
    // a query of a counter without its `_total` would draw nothing.
    let exported: BTreeSet<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let unknown: Vec<&String> = used.iter().filter(|n| !exported.contains(n.as_str())).collect();
    ensure!(unknown.is_empty(), "queried but not exported: {unknown:?}\nexported: {exported:?}");
    Ok(())
}
