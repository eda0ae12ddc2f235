//! Embeds the eBPF object that `cargo xtask build` produced.
//!
//! xtask builds `proxy-ebpf` first (it needs a different toolchain and
//! target) and passes the object's path in SPLICER_EBPF_OBJECT. A plain
//! `cargo build` without it still works: the binary then carries an empty
//! object and falls back to the userspace offload, saying why.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=SPLICER_EBPF_OBJECT");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("proxy-ebpf.o");
    match env::var("SPLICER_EBPF_OBJECT") {
        Ok(path) if !path.is_empty() => {
            println!("cargo:rerun-if-changed={path}");
            fs::copy(&path, &out).unwrap_or_else(|e| panic!("copy eBPF object {path}: {e}"));
        }
        _ => {
            println!("cargo:warning=SPLICER_EBPF_OBJECT not set: building without the eBPF object (use `cargo xtask build`)");
            fs::write(&out, b"").unwrap();
        }
    }
}
