//! The HTTP upgrade on a WebSocket listener: read the request head (with
//! limits), refuse it with a proper HTTP response, or rewrite its
//! forwarding headers for the broker; then wait for the broker's answer,
//! and let the connection be spliced only if it is `101 Switching
//! Protocols`. Until then no client byte behind the request reaches the
//! broker: a second request, pipelined or sent after a refusal, would
//! reach it with its own forwarding headers. Parsing and rewriting are in
//! splicer_proto::http_upgrade; the real-IP walk in splicer_proto::real_ip.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use tokio::net::TcpStream;

use splicer_proto::{
    http_upgrade::{self, Edit, Forwarding, Refusal},
    preamble::{UpgradeRequest, UpgradeResponse},
    real_ip,
    trust::Trusted,
};

use super::{
    client::Client,
    inbox::{Inbox, ReadError},
};
use crate::config::{ForwardMode, WsOptions};

/// An accepted upgrade: the head to send upstream and who the client is.
pub struct Upgrade {
    /// The rewritten request head.
    pub head: Vec<u8>,
    /// Bytes of the original head consumed from the client.
    pub consumed: usize,
    /// The real client after X-Forwarded-For resolution, and its port
    /// when known.
    pub client: IpAddr,
    pub port: Option<u16>,
}

/// Reads the upgrade request through `inbox` (from the client) within the
/// configured limits. `peer` is the client as known so far (after any
/// PROXY header). On refusal, the HTTP response has been sent and the
/// caller just closes.
pub async fn upgrade(
    ws: &WsOptions,
    trusted: &Trusted,
    inbox: &mut Inbox<'_, Client>,
    peer: SocketAddr,
) -> Result<Upgrade, Refusal> {
    let mut reader = UpgradeRequest::new(ws.header_max);
    let result = match tokio::time::timeout(ws.header_timeout, inbox.read(&mut reader)).await {
        Err(_) => Err(Refusal::Timeout),
        Ok(Err(ReadError::Refused(r))) => Err(r),
        // Nobody left to answer.
        Ok(Err(ReadError::Closed)) => {
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
            refuse(inbox.stream(), &refusal).await;
            return Err(refusal);
        }
    };
    let (client, client_port) = match &ws.real_ip_header {
        Some(name) => {
            let list = head.list(name);
            let found = real_ip::find(peer.ip(), &list, trusted, ws.real_ip_recursive);
            // The entry's own port, as nginx reads it; X-Forwarded-Port is
            // not matched up with the list: a hop that appends to one may
            // pass the other through as the client wrote it.
            let port = match found.index {
                None => Some(peer.port()),
                Some(_) => found.port,
            };
            (found.ip, port)
        }
        None => (peer.ip(), Some(peer.port())),
    };
    let forwarding = forwarding(ws, trusted.contains(peer.ip()), peer, client, client_port);
    Ok(Upgrade {
        head: http_upgrade::rewrite(&raw, &head, &forwarding),
        consumed: raw.len(),
        client,
        port: client_port,
    })
}

/// The broker did not switch protocols.
pub enum NoSwitch {
    /// It answered with this status; `response` is its answer, head and
    /// body, for the client.
    Status { status: u16, response: Vec<u8> },
    /// It closed, timed out, or sent something that is not an HTTP
    /// response: the client gets 502.
    Failed(String),
}

impl fmt::Display for NoSwitch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoSwitch::Status { status, .. } => write!(f, "the broker answered {status}"),
            NoSwitch::Failed(why) => write!(f, "no answer from the broker ({why})"),
        }
    }
}

/// A refusal's body is passed on up to this size; a longer one is cut.
const MAX_REFUSAL_BODY: usize = 64 * 1024;

/// Waits for the broker's answer to the upgrade request, within the
/// listener's header limits. `101`: the bytes read (the response and
/// anything behind it), for the client. Anything else: why not.
pub async fn await_switch(ws: &WsOptions, upstream: &TcpStream) -> Result<Vec<u8>, NoSwitch> {
    let mut inbox = Inbox::new(upstream);
    let answer = async move {
        let (head, mut response) = match inbox.read(&mut UpgradeResponse::new(ws.header_max)).await {
            Ok(read) => read,
            Err(ReadError::Closed) => return Err(NoSwitch::Failed("closed before answering".into())),
            Err(ReadError::Refused(why)) => return Err(NoSwitch::Failed(why)),
        };
        if head.status == 101 && !head.to_websocket {
            return Err(NoSwitch::Failed("it switched to something other than websocket".into()));
        }
        if head.status != 101 {
            let body = head.content_length.unwrap_or(0).min(MAX_REFUSAL_BODY);
            inbox.fill_to(body).await;
            let mut rest = inbox.into_rest();
            rest.truncate(body);
            response.extend_from_slice(&rest);
            return Err(NoSwitch::Status {
                status: head.status,
                response,
            });
        }
        response.extend_from_slice(&inbox.into_rest());
        Ok(response)
    };
    match tokio::time::timeout(ws.header_timeout, answer).await {
        Ok(answer) => answer,
        Err(_) => Err(NoSwitch::Failed(format!("no answer within {:?}", ws.header_timeout))),
    }
}

/// Passes the broker's refusal on to the client (or a `502` of our own)
/// and half-closes.
pub async fn pass_refusal(client: &Client, no: &NoSwitch) {
    match no {
        NoSwitch::Status { response, .. } => client.answer_and_close(response).await,
        NoSwitch::Failed(_) => refuse(client, &Refusal::BadGateway).await,
    }
}

/// nginx's variables: `override` sets the real client (`$remote_addr`, which
/// the realip module rewrites); `append` adds the direct peer
/// (`$proxy_add_x_forwarded_for`, built on `$realip_remote_addr`). An
/// untrusted peer's own claims (CLIENT_CLAIMS: X-Real-IP, which brokers
/// such as aedes prefer to X-Forwarded-For, Forwarded, ...) and its
/// `real-ip-header` are dropped; `set-real-ip-header` replaces its value
/// whoever sent it.
///
/// `override` puts in X-Forwarded-Port the port of the party it names in
/// X-Forwarded-For; when that party came from a header entry with no port,
/// X-Forwarded-Port is left out rather than name the hop's port.
fn forwarding(
    ws: &WsOptions,
    peer_trusted: bool,
    peer: SocketAddr,
    client: IpAddr,
    client_port: Option<u16>,
) -> Forwarding {
    let edit = |mode: ForwardMode, own: String, direct: String| match mode {
        ForwardMode::Override => Edit::Set(own),
        ForwardMode::Append => Edit::Append(direct),
    };
    Forwarding {
        forwarded_for: edit(ws.forwarded_for, client.to_string(), peer.ip().to_string()),
        forwarded_port: edit(
            ws.forwarded_port,
            client_port.map(|p| p.to_string()).unwrap_or_default(),
            peer.port().to_string(),
        ),
        set_header: ws
            .set_real_ip_header
            .clone()
            .map(|name| (name, client.to_string())),
        // An untrusted peer's own claims about the client go: the header
        // this listener would believe from a trusted one, and those that
        // brokers and the frameworks behind them are known to read.
        remove: match peer_trusted {
            true => Vec::new(),
            false => CLIENT_CLAIMS
                .iter()
                .map(|n| (*n).to_string())
                .chain(ws.real_ip_header.clone())
                .collect(),
        }
        .into_iter()
        .chain(ws.no_extensions.then(|| "Sec-WebSocket-Extensions".to_string()))
        .collect(),
    }
}

/// Headers that name the client, besides X-Forwarded-For/-Port (which are
/// rewritten anyway): removed when an untrusted peer sends them.
const CLIENT_CLAIMS: [&str; 8] = [
    "X-Real-IP",
    "Forwarded",
    "True-Client-IP",
    "X-Client-IP",
    "CF-Connecting-IP",
    "X-Cluster-Client-IP",
    "Fastly-Client-IP",
    "X-Original-Forwarded-For",
];

/// Answers a request with `refusal`'s HTTP response and half-closes.
pub async fn refuse(client: &Client, refusal: &Refusal) {
    client.answer_and_close(&refusal.response()).await;
}
