//! The certificates the TLS workloads serve, made with openssl in the run's
//! scratch dir at the start: for each key type a CA of its own and a leaf
//! it signed, so a handshake costs one kind of signature and one kind of
//! verification throughout.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

/// The name every certificate is for, which clients send as SNI.
pub const SERVER_NAME: &str = "bench.example";

/// The one TLS 1.3 cipher suite clients offer (the load generator's client
/// offers it alone too, with X25519 alone), so that every forwarder
/// negotiates the same whatever its defaults.
pub const SUITE: &str = "TLS_AES_128_GCM_SHA256";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KeyType {
    EcdsaP256,
    Rsa2048,
}

impl KeyType {
    /// openssl req's options for a new key of this type.
    fn newkey(self) -> &'static [&'static str] {
        match self {
            KeyType::EcdsaP256 => &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
            KeyType::Rsa2048 => &["-newkey", "rsa:2048"],
        }
    }

    fn file_stem(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::Rsa2048 => "rsa-2048",
        }
    }
}

/// One served certificate's files.
#[derive(Clone, Debug)]
pub struct Cert {
    /// The leaf (the whole chain served: the client holds the CA).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Leaf and key in one file, as HAProxy's `crt` wants them.
    pub combined: PathBuf,
    /// The only CA clients trust.
    pub ca: PathBuf,
}

/// A CA and a leaf for SERVER_NAME, both of `key_type`, in `dir`.
pub fn make(dir: &Path, key_type: KeyType) -> Result<Cert> {
    let file = |what: &str| dir.join(format!("{}-{what}.pem", key_type.file_stem()));
    let c = Cert {
        cert: file("cert"),
        key: file("key"),
        combined: file("combined"),
        ca: file("ca"),
    };
    let ca_key = file("ca-key");
    let req = || {
        let mut cmd = Command::new("openssl");
        cmd.args(["req", "-x509", "-nodes", "-days", "30"])
            .args(key_type.newkey());
        cmd
    };
    openssl(
        req()
            .args(["-subj", "/CN=splicer bench CA", "-keyout"])
            .arg(&ca_key)
            .arg("-out")
            .arg(&c.ca),
    )?;
    // A leaf, not a CA: rustls refuses a CA certificate as a server's.
    openssl(
        req()
            .arg("-CA")
            .arg(&c.ca)
            .arg("-CAkey")
            .arg(&ca_key)
            .args(["-subj", &format!("/CN={SERVER_NAME}")])
            .args(["-addext", &format!("subjectAltName=DNS:{SERVER_NAME}")])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(&c.key)
            .arg("-out")
            .arg(&c.cert),
    )?;
    fs::write(
        &c.combined,
        [fs::read(&c.cert)?, fs::read(&c.key)?].concat(),
    )?;
    Ok(c)
}

/// Runs openssl, its progress dots kept out of the bench's output unless
/// it fails.
fn openssl(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().context("cannot run openssl")?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
