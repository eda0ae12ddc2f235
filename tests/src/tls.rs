//! TLS for the tests: certificates made with openssl, and a TLS client
//! (Node's, bound to CLIENT_IP) that reports what the server it reached
//! presented and what it sent.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{ensure, Result};

use crate::{run_with_timeout, CLIENT_IP};

/// A self-signed ECDSA P-256 certificate for `name` (its CN and DNS SAN)
/// and its key, as PEM files in `dir`.
pub fn self_signed(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    let (st, out, err) = run_with_timeout(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
            .args(["-days", "2", "-subj", &format!("/CN={name}"), "-addext", &format!("subjectAltName=DNS:{name}")])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
        Duration::from_secs(20),
    )?;
    ensure!(st.success(), "openssl req: {st}\n{out}{err}");
    // Brokers drop privileges (mosquitto runs as its own user) before
    // reading the key; these are throwaway test keys.
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    Ok((cert, key))
}

/// What a TLS client saw of one connection.
#[derive(Debug)]
pub struct TlsSeen {
    /// The CN of the certificate the server presented.
    pub cn: String,
    /// Everything the server sent, as text, until it closed.
    pub body: String,
}

/// Connects to `to` from CLIENT_IP with TLS, asking for `sni` (None: no
/// server name), sends `send`, and reads until the server closes. Err if
/// the handshake fails (as when splicer refuses the ClientHello).
pub fn tls_exchange(to: SocketAddr, sni: Option<&str>, send: &str) -> Result<TlsSeen> {
    let script = r#"
const tls = require('tls');
const [host, port, sni, send, local] = process.argv.slice(1);
const opts = { host, port: +port, localAddress: local, rejectUnauthorized: false };
if (sni) opts.servername = sni;
let connected = false;
const s = tls.connect(opts, () => {
  connected = true;
  const cn = (s.getPeerCertificate().subject || {}).CN || '';
  process.stdout.write('CN ' + cn + '\n');
  s.write(send);
});
s.on('data', (d) => process.stdout.write(d));
s.on('end', () => process.exit(connected ? 0 : 1));
s.on('error', (e) => { process.stderr.write(e.message + '\n'); process.exit(1); });
"#;
    let (st, out, err) = run_with_timeout(
        Command::new("node").args(["-e", script, &to.ip().to_string(), &to.port().to_string()]).args([
            sni.unwrap_or(""),
            send,
            &CLIENT_IP.to_string(),
        ]),
        Duration::from_secs(10),
    )?;
    ensure!(st.success(), "TLS client ({sni:?}): {st}\n{out}{err}");
    let (first, body) = out.split_once('\n').unwrap_or((&out, ""));
    Ok(TlsSeen {
        cn: first.strip_prefix("CN ").unwrap_or_default().to_string(),
        body: body.to_string(),
    })
}
