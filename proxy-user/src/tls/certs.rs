//! A terminating listener's TLS settings, read from its PEM files into one
//! rustls `ServerConfig`: the certificates (chosen by the client's server
//! name against each certificate's own names, and among those by what the
//! client can verify: an RSA and an ECDSA pair may serve one name), the
//! protocol versions, ALPN, client-certificate checks and session
//! resumption. Read when the configuration is read (at start and on
//! SIGHUP), so a bad file is an error that names it and refuses the reload,
//! and a changed file is a changed listener.
use std::{
    fmt,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{bail, Context as _, Result};
use rustls::{
    server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache, WebPkiClientVerifier},
    sign::CertifiedKey,
    RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

/// `tls-min-version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum)]
pub enum MinVersion {
    #[serde(rename = "1.2")]
    #[value(name = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    #[value(name = "1.3")]
    Tls13,
}

/// `tls-client-auth`: whether a client must show a certificate signed by
/// `tls-client-ca`. One it shows is checked either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    Optional,
    Required,
}

/// A terminating listener's keys, as configured (paths, not contents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Certificate chain and key files, in pairs; the first pair answers
    /// clients whose server name no certificate names.
    pub pairs: Vec<(PathBuf, PathBuf)>,
    pub min_version: MinVersion,
    pub alpn: Vec<String>,
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
    pub handshake_timeout: std::time::Duration,
}

/// The settings, and what their files held when they were read.
#[derive(Clone)]
pub struct Terminate {
    pub settings: Settings,
    pub server: Arc<ServerConfig>,
    /// Each certificate's names and expiry, for the start-up line and the
    /// metric.
    pub certs: Vec<CertFacts>,
    /// The certificates as the handshake chooses among them.
    chains: Arc<ByName>,
    /// Of every file's bytes: a reload with the same paths and new files
    /// is a changed listener.
    contents: u64,
}

/// A served certificate as the logs and metrics show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    pub file: PathBuf,
    /// Its DNS names (subjectAltName, else the subject CN), lowercase.
    pub names: Vec<String>,
    /// notAfter, Unix seconds.
    pub not_after: i64,
    /// How it is signed and its key, as OpenSSL and HAProxy name them
    /// (RSA-SHA256, ecdsa-with-SHA256; RSA2048, EC256): the PROXY v2
    /// SSL_SIG_ALG and SSL_KEY_ALG of connections it serves.
    pub sig_alg: String,
    pub key_alg: String,
}

impl PartialEq for Terminate {
    fn eq(&self, o: &Self) -> bool {
        (&self.settings, self.contents) == (&o.settings, o.contents)
    }
}

/// Keys never reach a log line, `--check` included.
impl fmt::Debug for Terminate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Terminate")
            .field("settings", &self.settings)
            .field("certs", &self.certs)
            .finish_non_exhaustive()
    }
}

/// TLS sessions each terminating listener remembers for resumption by ID
/// (TLS 1.2; TLS 1.3 clients resume with tickets, which hold their own
/// state).
const SESSION_CACHE: usize = 4096;

/// Reads every file and builds the listener's rustls configuration.
pub fn load(s: Settings) -> Result<Terminate> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut contents = std::hash::DefaultHasher::new();
    let mut keys = Vec::new();
    let mut certs = Vec::new();
    for (cert_file, key_file) in &s.pairs {
        let chain_pem = read(cert_file, &mut contents)?;
        let chain = CertificateDer::pem_slice_iter(&chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{}: not a PEM certificate chain", cert_file.display()))?;
        let Some(leaf) = chain.first() else {
            bail!("{}: no certificate in it", cert_file.display());
        };
        let facts = cert_facts(cert_file, leaf)?;
        let key_pem = read(key_file, &mut contents)?;
        // The key's own error text could quote it: name the file only.
        let Ok(key) = PrivateKeyDer::from_pem_slice(&key_pem) else {
            bail!("{}: no PEM private key in it", key_file.display());
        };
        let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
            anyhow::anyhow!(
                "{} with {}: {e}",
                cert_file.display(),
                key_file.display()
            )
        })?;
        keys.push((facts.names.clone(), Arc::new(certified)));
        certs.push(facts);
    }
    if keys.is_empty() {
        bail!("no certificate given");
    }
    let versions: &[&rustls::SupportedProtocolVersion] = match s.min_version {
        MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        MinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .context("TLS versions")?;
    let builder = match &s.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let pem = read(ca_file, &mut contents)?;
            let mut roots = RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(&pem) {
                let ca = ca.with_context(|| format!("{}: not a PEM certificate", ca_file.display()))?;
                roots
                    .add(ca)
                    .with_context(|| format!("{}: a certificate that cannot be a CA", ca_file.display()))?;
            }
            if roots.is_empty() {
                bail!("{}: no certificate in it", ca_file.display());
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let verifier = match s.client_auth {
                ClientAuth::Required => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            };
            builder.with_client_cert_verifier(verifier.build().context("tls-client-ca")?)
        }
    };
    let chains = Arc::new(ByName { keys });
    let mut server = builder.with_cert_resolver(chains.clone());
    server.alpn_protocols = s.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    server.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
    server.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().context("TLS session tickets")?;
    Ok(Terminate {
        settings: s,
        server: Arc::new(server),
        certs,
        chains,
        contents: contents.finish(),
    })
}

fn read(path: &Path, contents: &mut impl Hasher) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    bytes.hash(contents);
    Ok(bytes)
}

fn cert_facts(file: &Path, der: &CertificateDer<'_>) -> Result<CertFacts> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("{}: the first certificate does not parse: {e}", file.display()))?;
    let mut names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if names.is_empty() {
        names.extend(cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(str::to_ascii_lowercase));
    }
    let (sig_alg, key_alg) = algorithms(&cert);
    Ok(CertFacts {
        file: file.to_path_buf(),
        names,
        not_after: cert.validity().not_after.timestamp(),
        sig_alg,
        key_alg,
    })
}

/// A certificate's signature algorithm by OpenSSL's short name (what
/// HAProxy sends), and its key as HAProxy writes it.
fn algorithms(cert: &x509_parser::certificate::X509Certificate<'_>) -> (String, String) {
    use x509_parser::{objects, oid_registry as oids, public_key::PublicKey};
    let sig = &cert.signature_algorithm.algorithm;
    let openssl = [
        (oids::OID_PKCS1_SHA256WITHRSA, "RSA-SHA256"),
        (oids::OID_PKCS1_SHA384WITHRSA, "RSA-SHA384"),
        (oids::OID_PKCS1_SHA512WITHRSA, "RSA-SHA512"),
        (oids::OID_PKCS1_RSASSAPSS, "RSASSA-PSS"),
        (oids::OID_SIG_ECDSA_WITH_SHA256, "ecdsa-with-SHA256"),
        (oids::OID_SIG_ECDSA_WITH_SHA384, "ecdsa-with-SHA384"),
        (oids::OID_SIG_ECDSA_WITH_SHA512, "ecdsa-with-SHA512"),
        (oids::OID_SIG_ED25519, "ED25519"),
    ];
    let sig_alg = openssl.iter().find(|(o, _)| o == sig).map_or_else(
        || objects::oid2sn(sig, objects::oid_registry()).map_or_else(|_| sig.to_id_string(), str::to_string),
        |(_, name)| (*name).to_string(),
    );
    let key_alg = match cert.public_key().parsed() {
        Ok(k @ PublicKey::RSA(_)) => format!("RSA{}", k.key_size()),
        Ok(k @ PublicKey::EC(_)) => format!("EC{}", k.key_size()),
        _ => "UNKNOWN".to_string(),
    };
    (sig_alg, key_alg)
}

/// The certificates of a listener, in the order given, each with its
/// names; picks one for each ClientHello (`pick`).
#[derive(Debug)]
struct ByName {
    keys: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

impl ByName {
    /// Among the certificates whose names take the server name (all of
    /// them when none does, or none was given), the first whose key can
    /// sign with a scheme the client offers; else the first of those (the
    /// handshake then fails, as it must).
    fn pick(&self, sni: Option<&str>, schemes: &[SignatureScheme]) -> usize {
        let sni = sni.map(str::to_ascii_lowercase);
        let takes = |i: &usize| {
            sni.as_deref().is_some_and(|s| self.keys[*i].0.iter().any(|n| name_takes(n, s)))
        };
        let named = (0..self.keys.len()).any(|i| takes(&i));
        let candidates = || (0..self.keys.len()).filter(move |i| !named || takes(i));
        candidates()
            .find(|&i| self.keys[i].1.key.choose_scheme(schemes).is_some())
            .or_else(|| candidates().next())
            .unwrap_or(0)
    }
}

impl ResolvesServerCert for ByName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.keys[self.pick(hello.server_name(), hello.signature_schemes())].1.clone())
    }
}

impl Terminate {
    /// Which certificate (an index into `certs`) a client asking for `sni`
    /// and able to verify `schemes` is served: what the resolver serves.
    pub fn pick(&self, sni: Option<&str>, schemes: &[SignatureScheme]) -> usize {
        self.chains.pick(sni, schemes)
    }
}

/// Whether a certificate name takes a server name (RFC 6125: a wildcard
/// stands for exactly one whole left-most label).
fn name_takes(name: &str, sni: &str) -> bool {
    match name.strip_prefix("*.") {
        Some(parent) => sni
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => name == sni,
    }
}

#[cfg(test)]
mod tests {
    use super::name_takes;

    #[test]
    fn a_wildcard_takes_one_label() {
        assert!(name_takes("a.example", "a.example"));
        assert!(!name_takes("a.example", "b.example"));
        assert!(name_takes("*.example", "a.example"));
        assert!(!name_takes("*.example", "b.a.example"));
        assert!(!name_takes("*.example", "example"));
        assert!(!name_takes("*.example", ".example"));
    }
}
