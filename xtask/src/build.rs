//! Building the eBPF object (bpfel-unknown-none, with whichever toolchain
//! can build `core` for it) and the splicer binary that embeds it.
use std::{path::PathBuf, process::Command};

use anyhow::{bail, Result};

use crate::{install, root, run_cmd};

/// Userspace cargo, told where the eBPF object is so build.rs embeds it.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.env("SPLICER_EBPF_OBJECT", ebpf_object());
    c
}

fn ebpf_object() -> PathBuf {
    root().join("proxy-ebpf/target/bpfel-unknown-none/release/proxy-ebpf")
}

/// Builds both halves; returns the splicer binary's path.
pub fn all(release: bool) -> Result<PathBuf> {
    ebpf()?;
    let mut cmd = cargo();
    cmd.current_dir(root()).args(["build", "-p", "splicer"]);
    if release {
        cmd.arg("--release");
    }
    run_cmd(&mut cmd)?;
    Ok(root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("splicer"))
}

pub fn ebpf() -> Result<()> {
    let Some(toolchain) = install::EbpfToolchain::detect() else {
        bail!("no toolchain can build the eBPF program: run `cargo xtask setup`");
    };
    let mut cmd = toolchain.cargo();
    cmd.current_dir(root().join("proxy-ebpf"))
        .env("PATH", install::path_with_cargo_bin())
        // Same flags as aya-build: BTF lets the kernel and bpftool show types.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        .args([
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ]);
    run_cmd(&mut cmd)?;
    if !ebpf_object().exists() {
        bail!("eBPF build produced no {}", ebpf_object().display());
    }
    Ok(())
}
