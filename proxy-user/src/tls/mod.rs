//! TLS terminated here (a listener with `tls-cert`): the settings read
//! from PEM files (certs.rs), the connection driven over the client socket
//! (conn.rs), and what a finished handshake settled (`Facts`), for the
//! PROXY v2 TLVs and the close line.
//!
//! Terminated connections are carried in userspace: kernel TLS (the `tls`
//! ULP with splice) would let the kernel carry them too, but this kernel
//! has no `tls` ULP to test it on, so there is no such path. It would go
//! where `Datapath::carry_tls` picks the relay.
pub mod certs;
pub mod conn;

use rustls::{HandshakeKind, ProtocolVersion, ServerConnection};
use splicer_proto::proxy_protocol::{self, Ssl};
use x509_parser::{objects, public_key::PublicKey};

/// What a handshake settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// "TLSv1.3" or "TLSv1.2", as OpenSSL (and HAProxy) name them.
    pub version: &'static str,
    /// The IANA name, e.g. TLS_AES_128_GCM_SHA256.
    pub cipher: String,
    pub sni: Option<String>,
    pub resumed: bool,
    /// The client's verified certificate, when it showed one.
    pub client: Option<ClientCert>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// The subject's CN (what EMQX's `peer_cert_as_username = cn` takes).
    pub cn: Option<String>,
    /// The certificate's signature algorithm, e.g. sha256WithRSAEncryption.
    pub sig_alg: String,
    /// Its key, e.g. RSA2048 or EC256 (HAProxy's `ssl_c_key_alg` form).
    pub key_alg: String,
}

impl Facts {
    pub fn of(s: &ServerConnection) -> Facts {
        let version = match s.protocol_version() {
            Some(ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "unknown",
        };
        let cipher = s.negotiated_cipher_suite().map_or_else(String::new, |c| {
            let name = c.suite().as_str().unwrap_or("unknown");
            // rustls names TLS 1.3 suites TLS13_*; IANA (and OpenSSL) TLS_*.
            name.strip_prefix("TLS13_").map_or_else(|| name.to_string(), |n| format!("TLS_{n}"))
        });
        Facts {
            version,
            cipher,
            sni: s.server_name().map(str::to_string),
            resumed: s.handshake_kind() == Some(HandshakeKind::Resumed),
            client: s.peer_certificates().and_then(|c| c.first()).and_then(|der| client_cert(der)),
        }
    }

    /// PP2_TYPE_SSL and PP2_TYPE_AUTHORITY for a PROXY v2 header.
    pub fn tlvs(&self) -> Vec<u8> {
        let cert = self.client.as_ref();
        let ssl = Ssl {
            cert_in_session: cert.is_some(),
            cert_on_connection: cert.is_some() && !self.resumed,
            version: self.version,
            cn: cert.and_then(|c| c.cn.as_deref()),
            cipher: &self.cipher,
            sig_alg: cert.map(|c| c.sig_alg.as_str()),
            key_alg: cert.map(|c| c.key_alg.as_str()),
        };
        proxy_protocol::ssl_tlvs(&ssl, self.sni.as_deref())
    }
}

fn client_cert(der: &[u8]) -> Option<ClientCert> {
    // rustls verified it; one x509-parser cannot read is shown without facts.
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    let sig = &cert.signature_algorithm.algorithm;
    let sig_alg = objects::oid2sn(sig, objects::oid_registry()).map_or_else(|_| sig.to_id_string(), str::to_string);
    let key_alg = match cert.public_key().parsed() {
        Ok(k @ PublicKey::RSA(_)) => format!("RSA{}", k.key_size()),
        Ok(k @ PublicKey::EC(_)) => format!("EC{}", k.key_size()),
        _ => {
            let alg = &cert.public_key().algorithm.algorithm;
            objects::oid2sn(alg, objects::oid_registry()).map_or_else(|_| alg.to_id_string(), str::to_string)
        }
    };
    Some(ClientCert { cn, sig_alg, key_alg })
}
