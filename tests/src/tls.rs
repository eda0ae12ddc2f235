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

/// A test CA and the certificates it signs, as PEM files in its folder.
pub struct Pki {
    dir: PathBuf,
    pub ca: PathBuf,
    ca_key: PathBuf,
}

/// The key of a certificate `Pki` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    EcP256,
    Rsa2048,
}

impl Pki {
    /// A new CA called `name` in `dir/name`.
    pub fn new(dir: &Path, name: &str) -> Result<Pki> {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir)?;
        let (ca, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
        openssl(
            Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
                .args(["-days", "2", "-subj", &format!("/CN={name}")])
                .arg("-keyout")
                .arg(&ca_key)
                .arg("-out")
                .arg(&ca),
        )?;
        Ok(Pki { dir, ca, ca_key })
    }

    /// A server certificate for DNS name `name` (also its CN), valid `days`,
    /// with an EC P-256 key.
    pub fn server(&self, name: &str, days: u32) -> Result<(PathBuf, PathBuf)> {
        self.server_with(name, days, KeyType::EcP256)
    }

    /// As `server`, with a key of type `key`.
    pub fn server_with(&self, name: &str, days: u32, key: KeyType) -> Result<(PathBuf, PathBuf)> {
        let ext = format!("subjectAltName=DNS:{name}\nextendedKeyUsage=serverAuth\n");
        let file = match key {
            KeyType::EcP256 => format!("server-{name}-{days}"),
            KeyType::Rsa2048 => format!("server-{name}-{days}-rsa"),
        };
        self.issue(&file, name, key, &ext, days)
    }

    /// A client certificate with subject CN `cn`.
    pub fn client(&self, cn: &str, key: KeyType) -> Result<(PathBuf, PathBuf)> {
        self.issue(&format!("client-{cn}"), cn, key, "extendedKeyUsage=clientAuth\n", 2)
    }

    fn issue(&self, file: &str, cn: &str, key: KeyType, ext: &str, days: u32) -> Result<(PathBuf, PathBuf)> {
        let (cert, key_file, csr, extfile) = (
            self.dir.join(format!("{file}.crt")),
            self.dir.join(format!("{file}.key")),
            self.dir.join(format!("{file}.csr")),
            self.dir.join(format!("{file}.ext")),
        );
        let newkey: &[&str] = match key {
            KeyType::EcP256 => &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"],
            KeyType::Rsa2048 => &["-newkey", "rsa:2048"],
        };
        openssl(
            Command::new("openssl")
                .args(["req", "-nodes", "-subj", &format!("/CN={cn}")])
                .args(newkey)
                .arg("-keyout")
                .arg(&key_file)
                .arg("-out")
                .arg(&csr),
        )?;
        std::fs::write(&extfile, format!("basicConstraints=CA:FALSE\n{ext}"))?;
        openssl(
            Command::new("openssl")
                // OpenSSL 3 gives each a random serial.
                .args(["x509", "-req", "-sha256", "-days", &days.to_string()])
                .arg("-in")
                .arg(&csr)
                .arg("-CA")
                .arg(&self.ca)
                .arg("-CAkey")
                .arg(&self.ca_key)
                .arg("-extfile")
                .arg(&extfile)
                .arg("-out")
                .arg(&cert),
        )?;
        // Brokers drop privileges before reading keys; these are test keys.
        std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        Ok((cert, key_file))
    }
}

fn openssl(cmd: &mut Command) -> Result<()> {
    let (st, out, err) = run_with_timeout(cmd, Duration::from_secs(30))?;
    ensure!(st.success(), "{cmd:?}: {st}\n{out}{err}");
    Ok(())
}

/// What `TlsClient` is told to do (tests/peers/tls-client.js).
#[derive(Debug, Default, Clone)]
pub struct TlsClient<'a> {
    pub servername: Option<&'a str>,
    /// Check the server's certificate against this CA.
    pub ca: Option<&'a Path>,
    pub cert: Option<(&'a Path, &'a Path)>,
    /// "TLSv1.2" to stay below 1.3.
    pub max_version: Option<&'a str>,
    /// ALPN protocols offered, comma-separated.
    pub alpn: Option<&'a str>,
    /// Signature algorithms offered, OpenSSL's names colon-separated
    /// ("ecdsa_secp256r1_sha256").
    pub sigalgs: Option<&'a str>,
    /// Bytes written in the clear before the handshake (a PROXY header).
    pub before: &'a [u8],
    /// Sent after the handshake, then close_notify and FIN.
    pub send: Option<&'a Path>,
    /// Between the halves of `send`.
    pub hold: Duration,
    /// Where what the server sent is written.
    pub out: Option<&'a Path>,
}

/// What the TLS client saw.
#[derive(Debug)]
pub struct TlsClientSaw {
    /// The CN of the certificate the server presented.
    pub cn: String,
    /// "TLSv1.3" or "TLSv1.2".
    pub protocol: String,
    /// The ALPN protocol agreed ("" for none).
    pub alpn: String,
    /// The server certificate's key: "EC" or "RSA".
    pub key: String,
    /// Bytes read until the server's end.
    pub bytes: u64,
}

impl TlsClient<'_> {
    /// Runs the client from CLIENT_IP against `to`. Err when the handshake
    /// or anything after it fails (the client's message in it).
    pub fn run(&self, to: SocketAddr, timeout: Duration) -> Result<TlsClientSaw> {
        let mut cmd = Command::new("node");
        cmd.arg(crate::peers_dir().join("tls-client.js"))
            .args(["--host", &to.ip().to_string(), "--port", &to.port().to_string()])
            .args(["--bind", &CLIENT_IP.to_string(), "--hold-ms", &self.hold.as_millis().to_string()]);
        if let Some(n) = self.servername {
            cmd.args(["--servername", n]);
        }
        if let Some(v) = self.max_version {
            cmd.args(["--max-version", v]);
        }
        if let Some(a) = self.alpn {
            cmd.args(["--alpn", a]);
        }
        if let Some(a) = self.sigalgs {
            cmd.args(["--sigalgs", a]);
        }
        if !self.before.is_empty() {
            cmd.args(["--before", &self.before.iter().map(|b| format!("{b:02x}")).collect::<String>()]);
        }
        for (flag, path) in [("--ca", self.ca), ("--send", self.send), ("--out", self.out)] {
            if let Some(p) = path {
                cmd.arg(flag).arg(p);
            }
        }
        if let Some((c, k)) = self.cert {
            cmd.arg("--cert").arg(c).arg("--key").arg(k);
        }
        let (st, out, err) = run_with_timeout(&mut cmd, timeout)?;
        ensure!(st.success(), "TLS client: {st}\n{out}{err}");
        let field = |event: &str, key: &str| {
            out.lines()
                .find(|l| crate::is_event(l, event))
                .and_then(|l| crate::json_field(l, key))
                .unwrap_or_default()
        };
        Ok(TlsClientSaw {
            cn: field("secure", "cn"),
            protocol: field("secure", "protocol"),
            alpn: field("secure", "alpn"),
            key: field("secure", "key"),
            bytes: field("end", "bytes").parse().unwrap_or(0),
        })
    }
}

/// A rustls client configuration trusting only `ca`, showing `cert` if
/// given, at `versions` (None: 1.3 and 1.2). Connections made with one
/// configuration resume each other's sessions.
pub fn client_config(
    ca: &Path,
    cert: Option<(&Path, &Path)>,
    versions: Option<&'static rustls::SupportedProtocolVersion>,
) -> Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider);
    let builder = match versions {
        Some(v) => builder.with_protocol_versions(&[v])?,
        None => builder.with_safe_default_protocol_versions()?,
    }
    .with_root_certificates(roots);
    let config = match cert {
        Some((c, k)) => builder.with_client_auth_cert(
            CertificateDer::pem_file_iter(c)?.collect::<Result<_, _>>()?,
            PrivateKeyDer::from_pem_file(k)?,
        )?,
        None => builder.with_no_client_auth(),
    };
    Ok(std::sync::Arc::new(config))
}

/// A blocking TLS client over a socket from CLIENT_IP (rustls, so a test
/// can write without reading, as a single-threaded device stack does).
pub fn blocking_tls(
    to: SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
    name: &str,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>> {
    let conn = rustls::ClientConnection::new(config, rustls_pki_types::ServerName::try_from(name.to_string())?)?;
    let sock = crate::connect_from(CLIENT_IP, to)?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    sock.set_write_timeout(Some(Duration::from_secs(20)))?;
    Ok(rustls::StreamOwned::new(conn, sock))
}
