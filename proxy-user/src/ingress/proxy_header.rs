//! Reading the PROXY header a listener requires from its peers, and
//! deciding whose address is the client's.
//!
//! The header is read through the connection's Inbox: what follows it
//! stays there for the next reader, or goes upstream first.
use std::net::SocketAddr;

use splicer_proto::{
    preamble::ProxyHeader,
    proxy_protocol::{self, Header, ParseError, Version},
    trust::{canonical, Trusted},
};

use tokio::net::TcpStream;

use super::inbox::{Inbox, ReadError};
use crate::config::{Listener, UntrustedProxy};

/// Largest header we read: v1 is at most 107 bytes; v2 may carry TLVs.
const MAX_HEADER: usize = 16 * 1024;

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    Missing,
    Invalid(String),
    TooLong,
    Timeout,
    /// The peer closed or reset before a whole header arrived.
    Closed,
    /// `--untrusted-proxy reject`.
    Untrusted,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Missing => write!(f, "no PROXY header"),
            Rejection::Invalid(why) => write!(f, "invalid PROXY header: {why}"),
            Rejection::TooLong => write!(f, "PROXY header too long"),
            Rejection::Timeout => write!(f, "PROXY header not complete in time"),
            Rejection::Closed => write!(f, "closed before a complete PROXY header"),
            Rejection::Untrusted => write!(f, "PROXY header from an untrusted peer"),
        }
    }
}

/// Who the client is, as far as this connection can tell.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The real client: from a trusted header, else the peer itself.
    pub client: SocketAddr,
    /// The header as received (trusted or not), and its bytes.
    pub inbound: Option<(Header, Vec<u8>)>,
    /// Whether the inbound header was believed.
    pub trusted: bool,
}

/// Reads the listener's required PROXY header (if any) and decides the
/// client's address. `peer` is the TCP peer.
pub async fn identify(
    config: &Listener,
    trusted: &Trusted,
    inbox: &mut Inbox<'_, TcpStream>,
    peer: SocketAddr,
) -> Result<Identity, Rejection> {
    let peer = SocketAddr::new(canonical(peer.ip()), peer.port());
    let Some(versions) = config.accept_proxy.versions() else {
        return Ok(Identity {
            client: peer,
            inbound: None,
            trusted: false,
        });
    };
    let mut reader = ProxyHeader::new(versions, MAX_HEADER);
    let read = tokio::time::timeout(config.proxy_timeout, inbox.read(&mut reader)).await;
    let (header, raw) = match read.map_err(|_| Rejection::Timeout)? {
        Ok(read) => read,
        // (The reader says More, never Incomplete.)
        Err(ReadError::Closed | ReadError::Refused(ParseError::Incomplete)) => return Err(Rejection::Closed),
        Err(ReadError::Refused(ParseError::Missing)) => return Err(Rejection::Missing),
        Err(ReadError::Refused(ParseError::TooLong)) => return Err(Rejection::TooLong),
        Err(ReadError::Refused(ParseError::Invalid(why))) => return Err(Rejection::Invalid(why)),
    };
    if !trusted.contains(peer.ip()) {
        if config.untrusted_proxy == UntrustedProxy::Reject {
            return Err(Rejection::Untrusted);
        }
        return Ok(Identity {
            client: peer,
            inbound: Some((header, raw)),
            trusted: false,
        });
    }
    // LOCAL, UNKNOWN and non-TCP families carry no client address.
    let client = header.addresses.map_or(peer, |(src, _)| {
        SocketAddr::new(canonical(src.ip()), src.port())
    });
    Ok(Identity {
        client,
        inbound: Some((header, raw)),
        trusted: true,
    })
}

/// The PROXY header to write upstream, if any. A trusted inbound header
/// that names a client is passed on verbatim with `proxy-passthrough`; otherwise a header is built
/// (`send-proxy`) with the real client as source and this node's address as
/// destination, keeping a trusted v2 header's TLVs. An untrusted peer's
/// claims never reach the broker: its header is replaced by one that names
/// the peer itself.
///
/// `tls`: the TLVs of the TLS this listener terminated (PP2_TYPE_SSL,
/// PP2_TYPE_AUTHORITY). They replace any an earlier hop sent about TLS, and
/// go in v2 headers only (v1 has no room for them).
pub fn upstream_header(config: &Listener, id: &Identity, local: SocketAddr, tls: Option<&[u8]>) -> Option<Vec<u8>> {
    let inbound = id.inbound.as_ref();
    // Verbatim only when it names a client: a LOCAL / UNKNOWN header sent
    // on would make the broker use splicer's address, not the peer's.
    if let (true, true, Some((h, raw))) = (config.proxy_passthrough, id.trusted, inbound) {
        if h.addresses.is_some() {
            return Some(raw.clone());
        }
    }
    let passthrough_version = inbound
        .filter(|_| config.proxy_passthrough)
        .map(|(h, _)| h.version);
    match config.send_proxy.version().or(passthrough_version)? {
        Version::V1 => Some(proxy_protocol::build_v1(id.client, local)),
        Version::V2 => {
            let mut tlvs = match (inbound, id.trusted) {
                (Some((h, _)), true) => proxy_protocol::tlvs_for_reemit(&h.tlvs),
                _ => Vec::new(),
            };
            if let Some(ours) = tls {
                // Ours first; an earlier hop's others as far as they fit.
                let earlier = std::mem::replace(&mut tlvs, ours.to_vec());
                for (typ, value) in proxy_protocol::tlvs(&earlier) {
                    if !proxy_protocol::describes_tls(typ) && tlvs.len() + 3 + value.len() <= proxy_protocol::V2_MAX_TLVS_LEN {
                        proxy_protocol::put_tlv(&mut tlvs, typ, value);
                    }
                }
            }
            Some(proxy_protocol::build_v2(id.client, local, &tlvs))
        }
    }
}
