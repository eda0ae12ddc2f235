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

use self::certs::Terminate;

/// The longest client certificate CN carried to the broker (X.509 asks
/// for 64 characters; a CN too long to be one is refused, not cut).
pub const MAX_CN: usize = 1024;

/// What a handshake settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// "TLSv1.3" or "TLSv1.2", as OpenSSL (and HAProxy) name them.
    pub version: &'static str,
    /// The IANA name, e.g. TLS_AES_128_GCM_SHA256.
    pub cipher: String,
    /// The name the client asked for: a DNS name (rustls checks that), not
    /// necessarily one a served certificate names.
    pub sni: Option<String>,
    pub resumed: bool,
    /// The client's certificate, verified against tls-client-ca, when it
    /// showed one in this session.
    pub client: Option<ClientCert>,
    /// The served certificate's signature and key algorithms.
    pub sig_alg: String,
    pub key_alg: String,
    /// The ALPN protocol agreed, if any.
    pub alpn: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// The subject's CN (what EMQX's `peer_cert_as_username = cn` takes);
    /// None when it has none, or none x509-parser can read as text.
    pub cn: Option<String>,
}

impl Facts {
    /// Err: the client certificate's CN cannot be carried (why). `served`
    /// is the certificate the handshake chose (`Terminate::pick`).
    pub fn of(s: &ServerConnection, t: &Terminate, served: usize) -> Result<Facts, &'static str> {
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
        let sni = s.server_name().map(str::to_string);
        let served = &t.certs[served];
        let client = match s.peer_certificates().and_then(|c| c.first()) {
            Some(der) => Some(ClientCert { cn: common_name(der)? }),
            None => None,
        };
        Ok(Facts {
            version,
            cipher,
            resumed: s.handshake_kind() == Some(HandshakeKind::Resumed),
            client,
            sig_alg: served.sig_alg.clone(),
            key_alg: served.key_alg.clone(),
            alpn: s.alpn_protocol().map(<[u8]>::to_vec),
            sni,
        })
    }

    /// PP2_TYPE_ALPN, PP2_TYPE_SSL and PP2_TYPE_AUTHORITY for a PROXY v2
    /// header.
    pub fn tlvs(&self) -> Vec<u8> {
        let cert = self.client.as_ref();
        let ssl = Ssl {
            cert_in_session: cert.is_some(),
            cert_on_connection: cert.is_some() && !self.resumed,
            version: self.version,
            cn: cert.and_then(|c| c.cn.as_deref()),
            cipher: &self.cipher,
            sig_alg: Some(&self.sig_alg),
            key_alg: Some(&self.key_alg),
        };
        proxy_protocol::ssl_tlvs(&ssl, self.sni.as_deref(), self.alpn.as_deref())
    }
}

/// The subject CN of a certificate rustls verified: None when it has
/// none; Err when it has one that cannot be carried as it is.
fn common_name(der: &[u8]) -> Result<Option<String>, &'static str> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Err("is in a certificate that does not parse");
    };
    let Some(cn) = cert.subject().iter_common_name().next() else {
        return Ok(None);
    };
    let Ok(text) = cn.as_str() else {
        return Err("is not in a text encoding (PrintableString, UTF8String, IA5String)");
    };
    if text.len() > MAX_CN {
        return Err("is longer than 1 KiB");
    }
    if text.chars().any(char::is_control) {
        return Err("holds control characters");
    }
    Ok(Some(text.to_string()))
}
