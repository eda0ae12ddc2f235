//! Reading the PROXY header a listener requires from its peers, and
//! deciding whose address is the client's.
//!
//! The header is read with MSG_PEEK and then exactly its length consumed
//! (see peek.rs).
use std::net::SocketAddr;

use tokio::net::TcpStream;

use splicer_proto::{
    proxy_protocol::{self, Header, ParseError, Version, Versions},
    trust::{canonical, Trusted},
};

use super::peek::{self, PeekError, Step};
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
    stream: &TcpStream,
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
    let (header, raw) = tokio::time::timeout(config.proxy_timeout, read_header(stream, versions))
        .await
        .map_err(|_| Rejection::Timeout)??;
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

/// Peeks until a whole header is there, then consumes exactly its bytes.
async fn read_header(
    stream: &TcpStream,
    versions: Versions,
) -> Result<(Header, Vec<u8>), Rejection> {
    let parsed = peek::read_preamble(stream, MAX_HEADER, |buf| {
        match proxy_protocol::parse(buf, versions) {
            Ok(h) => {
                let len = h.len;
                Step::Done(h, len)
            }
            Err(ParseError::Incomplete) => Step::More,
            Err(ParseError::Missing) => Step::Fail(Rejection::Missing),
            Err(ParseError::TooLong) => Step::Fail(Rejection::TooLong),
            Err(ParseError::Invalid(why)) => Step::Fail(Rejection::Invalid(why)),
        }
    })
    .await;
    parsed.map_err(|e| match e {
        PeekError::Parser(r) => r,
        PeekError::TooLong => Rejection::TooLong,
        PeekError::Closed => Rejection::Closed,
    })
}

/// The PROXY header to write upstream, if any. A trusted inbound header is
/// passed on verbatim with `proxy-passthrough`; otherwise a header is built
/// (`send-proxy`) with the real client as source and this node's address as
/// destination, keeping a trusted v2 header's TLVs. An untrusted peer's
/// claims never reach the broker: its header is replaced by one that names
/// the peer itself.
pub fn upstream_header(config: &Listener, id: &Identity, local: SocketAddr) -> Option<Vec<u8>> {
    let inbound = id.inbound.as_ref();
    if let (true, true, Some((_, raw))) = (config.proxy_passthrough, id.trusted, inbound) {
        return Some(raw.clone());
    }
    let passthrough_version = inbound
        .filter(|_| config.proxy_passthrough)
        .map(|(h, _)| h.version);
    match config.send_proxy.version().or(passthrough_version)? {
        Version::V1 => Some(proxy_protocol::build_v1(id.client, local)),
        Version::V2 => {
            let tlvs = match (inbound, id.trusted) {
                (Some((h, _)), true) => proxy_protocol::tlvs_for_reemit(&h.tlvs),
                _ => Vec::new(),
            };
            Some(proxy_protocol::build_v2(id.client, local, &tlvs))
        }
    }
}
