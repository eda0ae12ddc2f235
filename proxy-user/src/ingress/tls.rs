//! The ClientHello on a `tls-passthrough` listener, read through the Inbox
//! within `tls-hello-max` and `tls-hello-timeout`, for the server name that
//! picks the upstream group. TLS is not terminated: the ClientHello goes to
//! the broker unchanged, and what is refused is just closed (an alert would
//! be the terminating server's to send). Parsed in splicer_proto::tls_hello.
use std::fmt;

use splicer_proto::{
    preamble::TlsClientHello,
    tls_hello::{ClientHello, Refusal},
};

use super::{
    client::Client,
    inbox::{Inbox, ReadError},
    mqtt::Logged,
};
use crate::{config::TlsPassthrough, tls::Facts};

/// What a TLS connection keeps of its handshake for its close line: the
/// server name (a checked host name, at most 253 bytes), and when the
/// listener terminated it, the version and the client certificate's CN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSession {
    pub sni: Option<String>,
    pub terminated: Option<Terminated>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terminated {
    pub version: &'static str,
    /// Verified, but the client's CA chose it: quoted and capped like the
    /// client's other words.
    pub cn: Option<Logged>,
}

impl TlsSession {
    pub fn passed(sni: Option<String>) -> TlsSession {
        TlsSession { sni, terminated: None }
    }

    pub fn terminated(f: &Facts) -> TlsSession {
        TlsSession {
            sni: f.sni.clone(),
            terminated: Some(Terminated {
                version: f.version,
                cn: f.client.as_ref().and_then(|c| c.cn.as_deref()).map(Logged::new),
            }),
        }
    }
}

impl fmt::Display for TlsSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.sni {
            Some(n) => write!(f, "sni={n}")?,
            None => f.write_str("sni=-")?,
        }
        if let Some(t) = &self.terminated {
            write!(f, " tls_version={}", t.version)?;
            match &t.cn {
                Some(cn) => write!(f, " cn={cn}")?,
                None => f.write_str(" cn=-")?,
            }
        }
        Ok(())
    }
}

/// Why no ClientHello was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoHello {
    Refused(Refusal),
    Timeout,
    Closed,
}

impl NoHello {
    /// The `reason` label of `splicer_tls_hello_rejections`.
    pub fn label(self) -> &'static str {
        match self {
            NoHello::Refused(Refusal::NotTls) => "not_tls",
            NoHello::Refused(Refusal::Malformed(_)) => "malformed",
            NoHello::Refused(Refusal::TooLarge) => "too_large",
            NoHello::Timeout => "timeout",
            NoHello::Closed => "closed",
        }
    }
}

/// Every label `NoHello::label` gives, for the metric's series.
pub const NO_HELLO_LABELS: [&str; 5] = ["not_tls", "malformed", "too_large", "timeout", "closed"];

impl fmt::Display for NoHello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoHello::Refused(r) => r.fmt(f),
            NoHello::Timeout => f.write_str("no whole ClientHello within tls-hello-timeout"),
            NoHello::Closed => f.write_str("closed before a whole ClientHello"),
        }
    }
}

/// Reads the client's ClientHello, leaving its records in `inbox` (they
/// go to the broker as they came).
pub async fn read_hello(opts: &TlsPassthrough, inbox: &mut Inbox<'_, Client>) -> Result<ClientHello, NoHello> {
    let mut reader = TlsClientHello::new(opts.hello_max);
    match tokio::time::timeout(opts.hello_timeout, inbox.look(&mut reader)).await {
        Ok(Ok((hello, _))) => Ok(hello),
        Ok(Err(ReadError::Refused(r))) => Err(NoHello::Refused(r)),
        Ok(Err(ReadError::Closed)) => Err(NoHello::Closed),
        Err(_) => Err(NoHello::Timeout),
    }
}
