//! `cargo xtask dist`: a Debian package of what `cargo xtask build` makes,
//! laid out by hand and packed with dpkg-deb (Debian's own tool; nothing to
//! install): the binary with its eBPF object embedded, the systemd unit, the
//! bundled config as a conffile, the man page and shell completions that the
//! binary writes from its own flags, and maintainer scripts that create the
//! `splicer` system user.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::{build, root, run_cmd};

const POSTINST: &str = r#"#!/bin/sh
# The unit runs splicer as this user (dist/splicer.service).
set -e
if [ "$1" = configure ]; then
    if ! getent passwd splicer >/dev/null; then
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin splicer
    fi
    # The config may name key files; only root and splicer read it.
    chown root:splicer /etc/splicer/splicer.toml
    chmod 640 /etc/splicer/splicer.toml
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
fi
"#;

const POSTRM: &str = r#"#!/bin/sh
set -e
if [ "$1" = purge ] && getent passwd splicer >/dev/null; then
    userdel splicer || true
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
"#;

/// Builds the package; returns its path.
pub fn dist() -> Result<PathBuf> {
    let bin = build::all(true)?;
    let root = root();
    let out = root.join("target/dist");
    let stage = out.join("stage");
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    let put = |rel: &str, data: &[u8], mode: u32| -> Result<()> {
        let path = stage.join(rel);
        fs::create_dir_all(path.parent().context("a file has a folder")?)?;
        fs::write(&path, data)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    put("usr/bin/splicer", &fs::read(&bin)?, 0o755)?;
    // The build keeps line tables for profiling; the package needs none.
    run_cmd(Command::new("strip").arg("--strip-debug").arg(stage.join("usr/bin/splicer")))?;
    let unit = fs::read_to_string(root.join("dist/splicer.service"))?
        .replace("ExecStart=/usr/local/bin/splicer", "ExecStart=/usr/bin/splicer");
    put("usr/lib/systemd/system/splicer.service", unit.as_bytes(), 0o644)?;
    put("etc/splicer/splicer.toml", &fs::read(root.join("splicer.toml"))?, 0o640)?;
    let docs = out.join("docs");
    run_cmd(Command::new(&bin).arg("--write-docs").arg(&docs))?;
    run_cmd(Command::new("gzip").args(["-9nf"]).arg(docs.join("splicer.1")))?;
    put("usr/share/man/man1/splicer.1.gz", &fs::read(docs.join("splicer.1.gz"))?, 0o644)?;
    put("usr/share/bash-completion/completions/splicer", &fs::read(docs.join("splicer.bash"))?, 0o644)?;
    put("usr/share/zsh/vendor-completions/_splicer", &fs::read(docs.join("_splicer"))?, 0o644)?;
    put("usr/share/fish/vendor_completions.d/splicer.fish", &fs::read(docs.join("splicer.fish"))?, 0o644)?;
    let arch = String::from_utf8(Command::new("dpkg").arg("--print-architecture").output()?.stdout)?;
    let version = env!("CARGO_PKG_VERSION");
    let control = format!(
        "Package: splicer\nVersion: {version}\nArchitecture: {}\nMaintainer: splicer developers <splicer@localhost>\n\
         Depends: libc6, libgcc-s1, passwd\nSection: net\nPriority: optional\nInstalled-Size: {}\n\
         Description: eBPF-assisted forwarding proxy for MQTT brokers\n \
         Accepts MQTT over TCP, WebSocket and TLS and hands each connection to a\n \
         broker, telling it who the client is (PROXY protocol, X-Forwarded-For);\n \
         an eBPF sockmap program then splices the two sockets in the kernel.\n",
        arch.trim(),
        dir_kib(&stage)?
    );
    put("DEBIAN/control", control.as_bytes(), 0o644)?;
    put("DEBIAN/conffiles", b"/etc/splicer/splicer.toml\n", 0o644)?;
    put("DEBIAN/postinst", POSTINST.as_bytes(), 0o755)?;
    put("DEBIAN/postrm", POSTRM.as_bytes(), 0o755)?;
    let deb = out.join(format!("splicer_{version}_{}.deb", arch.trim()));
    run_cmd(Command::new("dpkg-deb").args(["--root-owner-group", "--build"]).arg(&stage).arg(&deb))?;
    Ok(deb)
}

/// What the files take, in KiB (the control file's Installed-Size).
fn dir_kib(dir: &Path) -> Result<u64> {
    let mut bytes = 0;
    for e in fs::read_dir(dir)? {
        let e = e?;
        bytes += match e.file_type()?.is_dir() {
            true => dir_kib(&e.path())? * 1024,
            false => e.metadata()?.len(),
        };
    }
    Ok(bytes.div_ceil(1024))
}
