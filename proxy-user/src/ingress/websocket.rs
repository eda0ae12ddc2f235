//! The HTTP upgrade on a WebSocket listener: read the request head (with
//! limits), refuse it with a proper HTTP response, or rewrite its
//! forwarding headers for the broker. Parsing and rewriting are in
//! splicer_proto::http_upgrade; the real-IP walk in splicer_proto::real_ip.
use std::net::{IpAddr, SocketAddr};

use tokio::net::TcpStream;

use splicer_proto::{
    http_upgrade::{self, Edit, Forwarding, Refusal},
    real_ip,
    trust::Trusted,
};

use super::peek::{self, PeekError, Step};
use crate::{
    config::{ForwardMode, WsOptions},
    net,
};

/// An accepted upgrade: the head to send upstream and who the client is.
pub struct Upgrade {
    /// The rewritten request head.
    pub head: Vec<u8>,
    /// Bytes of the original head consumed from the client.
    pub consumed: usize,
    /// The real client after X-Forwarded-For resolution.
    pub client: IpAddr,
}

/// Reads the upgrade request from `client` within the configured limits.
/// `peer` is the client as known so far (after any PROXY header). On
/// refusal, the HTTP response has been sent and the caller just closes.
pub async fn upgrade(
    ws: &WsOptions,
    trusted: &Trusted,
    client: &TcpStream,
    peer: SocketAddr,
) -> Result<Upgrade, Refusal> {
    let read = peek::read_preamble(client, ws.header_max, |buf| match http_upgrade::parse_head(
        buf,
        ws.header_max,
    ) {
        Ok(Some(head)) => {
            let len = head.len;
            Step::Done(head, len)
        }
        Ok(None) => Step::More,
        Err(r) => Step::Fail(r),
    });
    let result = match tokio::time::timeout(ws.header_timeout, read).await {
        Err(_) => Err(Refusal::Timeout),
        Ok(Err(PeekError::Parser(r))) => Err(r),
        Ok(Err(PeekError::TooLong)) => Err(Refusal::TooLarge),
        // Nobody left to answer.
        Ok(Err(PeekError::Closed)) => {
            return Err(Refusal::BadRequest(
                "closed before a complete request".into(),
            ))
        }
        Ok(Ok((head, raw))) => head
            .check_websocket(ws.path.as_deref())
            .map(|()| (head, raw)),
    };
    let (head, raw) = match result {
        Ok(ok) => ok,
        Err(refusal) => {
            refuse(client, &refusal).await;
            return Err(refusal);
        }
    };
    let client_ip = match &ws.real_ip_header {
        Some(name) => real_ip::resolve(peer.ip(), &head.list(name), trusted, ws.real_ip_recursive),
        None => peer.ip(),
    };
    let forwarding = forwarding(ws, trusted.contains(peer.ip()), peer, client_ip);
    Ok(Upgrade {
        head: http_upgrade::rewrite(&raw, &head, &forwarding),
        consumed: raw.len(),
        client: client_ip,
    })
}

/// nginx's variables: `override` sets the real client (`$remote_addr`, which
/// the realip module rewrites); `append` adds the direct peer
/// (`$proxy_add_x_forwarded_for`, built on `$realip_remote_addr`). An
/// untrusted peer's own X-Real-IP is dropped (brokers such as aedes prefer
/// it to X-Forwarded-For) unless `set-real-ip-header` replaces it anyway.
fn forwarding(ws: &WsOptions, peer_trusted: bool, peer: SocketAddr, client: IpAddr) -> Forwarding {
    let edit = |mode: ForwardMode, own: String, direct: String| match mode {
        ForwardMode::Override => Edit::Set(own),
        ForwardMode::Append => Edit::Append(direct),
    };
    Forwarding {
        forwarded_for: edit(ws.forwarded_for, client.to_string(), peer.ip().to_string()),
        forwarded_port: edit(
            ws.forwarded_port,
            peer.port().to_string(),
            peer.port().to_string(),
        ),
        set_header: ws
            .set_real_ip_header
            .clone()
            .map(|name| (name, client.to_string())),
        remove: match peer_trusted {
            true => Vec::new(),
            false => vec![X_REAL_IP.to_string()],
        },
    }
}

const X_REAL_IP: &str = "X-Real-IP";

/// Answers a request with `refusal`'s HTTP response and half-closes.
pub async fn refuse(client: &TcpStream, refusal: &Refusal) {
    let _ = net::write_all(client, &refusal.response()).await;
    close_gently(client);
}

/// Reads what is left of a refused request and half-closes, so the client
/// gets the response and a FIN rather than a reset (closing a socket with
/// unread bytes makes the kernel send RST, which can destroy the response).
fn close_gently(client: &TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    for _ in 0..16 {
        match client.try_read(&mut buf) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
    let _ = socket2::SockRef::from(client).shutdown(std::net::Shutdown::Write);
}
