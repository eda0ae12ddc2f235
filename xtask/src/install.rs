//! Installing what the build and the tests need, only when it is missing.
//! Everything comes from Debian's packages, crates.io and npm.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Result};

use crate::{root, run_cmd};

/// Debian packages behind the eBPF toolchain: a rustc with its library
/// source (to build `core` for bpfel-unknown-none) and the LLVM that
/// bpf-linker links against (same major version as that rustc's LLVM).
const TOOLCHAIN_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "bpftool",
];
const LLVM_MAJOR: &str = "22";

/// Real peers the end-to-end tests run against.
const TEST_PACKAGES: &[&str] = &[
    "mosquitto",
    "mosquitto-clients",
    "nginx",
    "libnginx-mod-stream",
    "haproxy",
    "iproute2",
    "util-linux",
    // Drops the kernel's RSTs for tests/tests/retransmission.rs's raw client.
    "nftables",
    // Test CAs and certificates (tests/src/tls.rs), and s_client.
    "openssl",
    // promtool, for dist/prometheus/splicer-rules.yml and its tests.
    "prometheus",
    // A DNS server on loopback whose answers the upstream-name tests change.
    "dnsmasq-base",
];

pub enum EbpfToolchain {
    /// Debian's rustc + rust-web-src, with RUSTC_BOOTSTRAP for -Z build-std.
    Debian,
    /// rustup nightly with rust-src (aya's usual set-up).
    Nightly,
}

impl EbpfToolchain {
    pub fn detect() -> Option<Self> {
        if nightly_has_rust_src() {
            return Some(EbpfToolchain::Nightly);
        }
        if Path::new("/usr/bin/rustc").exists()
            && Path::new("/usr/lib/rustlib/src/rust/library/core").exists()
        {
            return Some(EbpfToolchain::Debian);
        }
        None
    }

    pub fn cargo(&self) -> Command {
        match self {
            EbpfToolchain::Debian => {
                let mut c = Command::new("/usr/bin/cargo");
                c.env("RUSTC", "/usr/bin/rustc")
                    .env("RUSTC_BOOTSTRAP", "1")
                    .env_remove("RUSTUP_TOOLCHAIN");
                c
            }
            EbpfToolchain::Nightly => {
                let mut c = Command::new("rustup");
                c.args(["run", "nightly", "cargo"]);
                c
            }
        }
    }
}

fn nightly_has_rust_src() -> bool {
    Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src"))
        .unwrap_or(false)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn cargo_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        })
        .join("bin")
}

/// PATH with cargo's bin directory first, where bpf-linker is installed.
pub fn path_with_cargo_bin() -> String {
    format!(
        "{}:{}",
        cargo_bin().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn missing_packages(pkgs: &[&str]) -> Vec<String> {
    pkgs.iter()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .map(|p| p.to_string())
        .collect()
}

fn apt_install(pkgs: &[&str]) -> Result<()> {
    let missing = missing_packages(pkgs);
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages: run `sudo apt-get install -y {}`",
            missing.join(" ")
        );
    }
    eprintln!("installing Debian packages: {}", missing.join(" "));
    run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
    run_cmd(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
}

/// The eBPF toolchain: Debian's rustc/library source (unless rustup
/// nightly has rust-src) and a bpf-linker built against the matching LLVM.
pub fn toolchain() -> Result<()> {
    let nightly = nightly_has_rust_src();
    if !nightly {
        apt_install(TOOLCHAIN_PACKAGES)?;
    } else {
        apt_install(&["bpftool"])?;
    }
    if cargo_bin().join("bpf-linker").exists() {
        return Ok(());
    }
    eprintln!("installing bpf-linker");
    let mut cmd = Command::new("cargo");
    cmd.args(["install", "bpf-linker"]);
    if !nightly {
        let prefix = format!("/usr/lib/llvm-{LLVM_MAJOR}");
        cmd.args([
            "--no-default-features",
            "--features",
            &format!("llvm-{LLVM_MAJOR}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .env(
            "PATH",
            format!("{prefix}/bin:{}", std::env::var("PATH").unwrap_or_default()),
        );
    }
    run_cmd(&mut cmd)
}

/// What `cargo xtask bench` compares splicer with, and its MQTT broker.
pub fn bench_peers() -> Result<()> {
    apt_install(&[
        "haproxy",
        "nginx",
        "libnginx-mod-stream",
        "mosquitto",
        "iperf3",
        // The TLS workloads' certificates, and `openssl s_time`.
        "openssl",
    ])
}

/// Brokers, proxies and clients for the end-to-end tests.
pub fn test_peers() -> Result<()> {
    apt_install(TEST_PACKAGES)?;
    // The machine may ship its own Node.js; Debian's only when there is none.
    if !has_command("node") || !has_command("npm") {
        apt_install(&["nodejs", "npm"])?;
    }
    let peers = root().join("tests/peers");
    if !peers.join("node_modules/.package-lock.json").exists() {
        eprintln!("installing npm test peers (aedes, aedes-protocol-decoder, mqtt)");
        run_cmd(
            Command::new("npm")
                .current_dir(&peers)
                .args(["ci", "--no-audit", "--no-fund"]),
        )?;
    }
    Ok(())
}

/// cargo-fuzz, for `cargo +nightly fuzz run` (libFuzzer needs -Z sanitizer,
/// so a rustup nightly toolchain; rust-src is not needed). Ok(false) when
/// there is no nightly toolchain, so the caller can skip fuzzing.
pub fn fuzzer() -> Result<bool> {
    let has_nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has_nightly {
        return Ok(false);
    }
    if !cargo_bin().join("cargo-fuzz").exists() {
        eprintln!("installing cargo-fuzz");
        run_cmd(Command::new("cargo").args(["install", "cargo-fuzz"]))?;
    }
    Ok(true)
}

fn has_command(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
