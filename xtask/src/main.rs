//! `cargo xtask`: build, run and test splicer, installing what is missing.
mod bench;
mod build;
mod dist;
mod install;
mod layers;

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "splicer's build, run and test tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain (idempotent).
    Setup,
    /// Build the eBPF object and the splicer binary that embeds it.
    Build {
        /// Debug profile for the userspace binary.
        #[arg(long)]
        debug: bool,
    },
    /// Build, then run splicer (as root). Without ARGS: `--config splicer.toml`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: unit tests, then the end-to-end suite with real peers.
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// Build the Debian package (target/dist/splicer_VERSION_ARCH.deb).
    Dist,
    /// Check that the splicer binary's modules form no cycle (also part
    /// of `test`).
    Layers {
        /// The source folder [default: proxy-user/src].
        src: Option<PathBuf>,
    },
    /// Benchmark splicer (both offload modes) against a direct connection,
    /// HAProxy and nginx on loopback; writes bench.md, bench.json and
    /// bench.svg and prints the Markdown. Needs root.
    Bench {
        /// A short pass (about a minute) with small sizes: a smoke check.
        #[arg(long)]
        quick: bool,
        /// Where the report goes [default: target/bench].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Only the workloads whose name contains this, in any case (e.g.
        /// `--only tls`, `--only "mqtt reconnect"`).
        #[arg(long, value_name = "TEXT")]
        only: Option<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => install::toolchain(),
        Task::Build { debug } => build::all(!debug).map(|_| ()),
        Task::Run { args } => run(args),
        Task::Test { filter } => test(filter),
        Task::Dist => {
            install::toolchain()?;
            println!("{}", dist::dist()?.display());
            Ok(())
        }
        Task::Layers { src } => {
            let src = src.unwrap_or_else(|| root().join("proxy-user/src"));
            println!("module graph: {}", layers::check(&src)?);
            Ok(())
        }
        Task::Bench { quick, out, only } => {
            let md = bench::run(quick, only.as_deref(), &out.unwrap_or_else(bench::default_out))?;
            println!("{md}");
            Ok(())
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs a command, failing with its command line if it fails.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("command failed ({status}): {cmd:?}");
    }
    Ok(())
}

fn run(args: Vec<String>) -> Result<()> {
    install::toolchain()?;
    let bin = build::all(true)?;
    let args = if args.is_empty() {
        vec![
            "--config".into(),
            root().join("splicer.toml").display().to_string(),
        ]
    } else {
        args
    };
    let mut cmd = if install::is_root() {
        Command::new(&bin)
    } else {
        let mut c = Command::new("sudo");
        c.arg("-E").arg(&bin);
        c
    };
    eprintln!("running {} {}", bin.display(), args.join(" "));
    run_cmd(cmd.args(&args))
}

fn test(filter: Option<String>) -> Result<()> {
    install::toolchain()?;
    install::test_peers()?;
    let bin = build::all(true)?;
    let root = root();
    let filter: Vec<String> = filter.into_iter().collect();
    let mut tally = Tally::default();
    // The layering of docs/architecture.md: no module cycle in the binary.
    println!("module graph: {}", layers::check(&root.join("proxy-user/src"))?);
    tally.passed += 1;
    // Unit tests: the protocol parsers, config, balancing, parking, ...
    tally.run(
        build::cargo()
            .current_dir(&root)
            .args([
                "test",
                "--release",
                "-p",
                "splicer",
                "-p",
                "proxy-common",
                "-p",
                "splicer-proto",
                "-p",
                "splicer-testkit",
                "-p",
                "xtask",
                "--",
            ])
            .args(&filter),
    )?;
    // The package, for tests/tests/package.rs to install.
    let deb = dist::dist()?;
    // End to end, against real brokers and proxies. One at a time: they
    // measure CPU and count fds, and the machine has two cores.
    tally.run(
        build::cargo()
            .current_dir(&root)
            .env("SPLICER_DEB", &deb)
            .env("SPLICER_BIN", &bin)
            .env("SPLICER_PEERS", root.join("tests/peers"))
            .args([
                "test",
                "--release",
                "-p",
                "splicer-tests",
                "--",
                "--test-threads=1",
            ])
            .args(&filter),
    )?;
    // The benchmark's short pass, so it can't rot: no timing is checked,
    // but every forwarder must deliver every byte and message.
    if filter.first().is_none_or(|f| f.contains("bench")) {
        bench::run(true, None, &root.join("target/bench-quick"))?;
        println!("bench --quick: ok (report in target/bench-quick/bench.md)");
        tally.passed += 1;
    }
    if filter.first().is_none_or(|f| f.contains("fuzz")) {
        fuzz()?;
    }
    // One closing line for the whole run (cargo prints one per test binary).
    println!("{} passed, {} failed", tally.passed, tally.failed);
    Ok(())
}

/// Adds up cargo test's `test result:` lines while passing output through.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
}

impl Tally {
    fn run(&mut self, cmd: &mut Command) -> Result<()> {
        use std::io::{BufRead, BufReader};
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let count = |word: &str| {
                    rest.split(';')
                        .find_map(|part| {
                            part.trim().strip_suffix(word).map(|n| {
                                n.trim()
                                    .trim_start_matches("ok.")
                                    .trim_start_matches("FAILED.")
                                    .trim()
                                    .to_string()
                            })
                        })
                        .and_then(|n| n.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                self.passed += count("passed");
                self.failed += count("failed");
            }
        }
        let status = child.wait()?;
        if !status.success() {
            bail!("command failed ({status}): {cmd:?}");
        }
        Ok(())
    }
}

/// Coverage-guided fuzzing of the parsers that read what clients send: the
/// PROXY protocol parser, the WebSocket upgrade rewriter, the MQTT
/// CONNECT parser and the TLS ClientHello reader, 30 s each.
fn fuzz() -> Result<()> {
    if !install::fuzzer()? {
        eprintln!("fuzz: skipped, no nightly toolchain");
        return Ok(());
    }
    for target in ["proxy_protocol", "http_upgrade", "mqtt_connect", "tls_hello"] {
        eprintln!("fuzz: fuzzing {target} for 30 s (cargo +nightly fuzz run {target} in fuzz/)");
        run_cmd(
            Command::new("cargo")
                .current_dir(root().join("fuzz"))
                .env("PATH", install::path_with_cargo_bin())
                .args(["+nightly", "fuzz", "run", target, "--"])
                .args(["-max_total_time=30", "-rss_limit_mb=2048"]),
        )?;
    }
    Ok(())
}
