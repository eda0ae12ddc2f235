//! The Debian package `cargo xtask dist` builds (issue 15), installed on
//! this machine with `dpkg -i`: the installed binary checks the installed
//! config, runs as the `splicer` user the package created with exactly the
//! capabilities of the installed unit and splices, and the man page and
//! completions are where their tools look. Purged at the end.
use std::{fs, io::Read as _, process::Command, thread, time::Duration};

use anyhow::{ensure, Context as _, Result};
use splicer_tests::*;

fn run(cmd: &mut Command) -> Result<String> {
    let (st, out, err) = run_with_timeout(cmd, Duration::from_secs(60))?;
    ensure!(st.success(), "{cmd:?}: {st}\n{out}{err}");
    Ok(out)
}

/// The capabilities an installed unit's `AmbientCapabilities=` grants.
fn unit_caps(unit: &str) -> Result<Vec<String>> {
    let line = unit
        .lines()
        .find_map(|l| l.trim().strip_prefix("AmbientCapabilities="))
        .context("no AmbientCapabilities= in the installed unit")?;
    Ok(line.split_whitespace().map(str::to_string).collect())
}

#[test]
fn the_package_installs_checks_and_runs_as_its_user() -> Result<()> {
    let deb = std::env::var("SPLICER_DEB").context("SPLICER_DEB: run through `cargo xtask test`, which builds the package")?;
    run(Command::new("dpkg").arg("-i").arg(&deb))?;
    let result = installed();
    let purge = run(Command::new("dpkg").args(["--purge", "splicer"]));
    result?;
    purge?;
    let (st, ..) = run_with_timeout(Command::new("getent").args(["passwd", "splicer"]), Duration::from_secs(10))?;
    ensure!(!st.success(), "purging left the splicer user");
    Ok(())
}

fn installed() -> Result<()> {
    let checked = run(Command::new("/usr/bin/splicer").args(["--check", "--config", "/etc/splicer/splicer.toml"]))?;
    ensure!(checked.starts_with("configuration ok"), "{checked}");
    let user = run(Command::new("getent").args(["passwd", "splicer"]))?;
    let fields: Vec<&str> = user.trim().split(':').collect();
    ensure!(fields.len() == 7 && fields[6] == "/usr/sbin/nologin", "{user}");
    let (uid, gid): (u32, u32) = (fields[2].parse()?, fields[3].parse()?);
    let conf = fs::metadata("/etc/splicer/splicer.toml")?;
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    ensure!(conf.uid() == 0 && conf.gid() == gid && conf.permissions().mode() & 0o777 == 0o640, "config owner/mode {conf:?}");
    let dpkg_conffiles = run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "splicer"]))?;
    ensure!(dpkg_conffiles.contains("/etc/splicer/splicer.toml"), "{dpkg_conffiles}");
    // The man page and completions, from the binary's own flags.
    let mut man = String::new();
    let gz = fs::read("/usr/share/man/man1/splicer.1.gz")?;
    let mut child = Command::new("gzip").arg("-dc").stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn()?;
    {
        use std::io::Write as _;
        child.stdin.take().context("stdin")?.write_all(&gz)?;
    }
    child.stdout.take().context("stdout")?.read_to_string(&mut man)?;
    child.wait()?;
    ensure!(
        man.contains(".TH splicer") && (man.contains("tls\\-cert") || man.contains("tls-cert")),
        "man page: {}",
        &man[..man.len().min(300)]
    );
    let completion = run(Command::new("bash").args(["-c", "source /usr/share/bash-completion/completions/splicer && complete -p splicer"]))?;
    ensure!(completion.contains("splicer"), "{completion}");
    for f in ["/usr/share/zsh/vendor-completions/_splicer", "/usr/share/fish/vendor_completions.d/splicer.fish"] {
        ensure!(fs::metadata(f).is_ok(), "{f} missing");
    }
    // The installed unit runs the installed binary, as splicer, with these
    // capabilities: so does this run, and the offload loads.
    let unit = fs::read_to_string("/usr/lib/systemd/system/splicer.service")?;
    ensure!(unit.contains("ExecStart=/usr/bin/splicer --config /etc/splicer/splicer.toml") && unit.contains("User=splicer"), "{unit}");
    let caps = unit_caps(&unit)?;
    let list: String = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase())))
        .collect::<Vec<_>>()
        .join(",");
    let (_l, up) = listen_on(BROKER_IP)?;
    let listen = v4(SPLICER_IP, free_port(SPLICER_IP));
    let dir = scratch("package");
    let mut p = Proc::spawn(
        "splicer",
        &dir,
        Command::new("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .arg(format!("--inh-caps={list}"))
            .arg(format!("--ambient-caps={list}"))
            .arg(format!("--bounding-set={list}"))
            .arg("--no-new-privs")
            .args(["--", "/usr/bin/splicer", "--listen", &listen.to_string(), "--upstream", &up.to_string(), "--offload", "sockmap"]),
    )?;
    p.wait_line("listening on", STEP)?;
    let offload = p.lines_with("offload: ");
    ensure!(offload.iter().any(|l| l.contains("offload: sockmap")), "{}", p.output());
    let status = fs::read_to_string(format!("/proc/{}/status", p.pid()))?;
    ensure!(status.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some(&uid.to_string())), "{status}");
    p.stop();
    thread::sleep(Duration::from_millis(100));
    Ok(())
}
