//! The first packet on an MQTT listener: a CONNECT, read through the Inbox
//! within `mqtt-connect-max` and `mqtt-connect-timeout`, over TCP before an
//! upstream is chosen, over WebSocket from the first frames after the
//! broker's 101. Anything else is refused as a broker would refuse it (a
//! CONNACK with the fitting code for a client that can read one, then the
//! close). The packet itself is parsed in splicer_proto::mqtt; its bytes go
//! to the broker unchanged.
use std::fmt;

use splicer_proto::{
    mqtt::{self, Connect, Refusal, Version},
    preamble::{MqttConnect, MqttConnectInWs},
    ws_frame,
};
use super::{
    client::Client,
    inbox::{Inbox, ReadError},
};
use crate::config::MqttOptions;

/// Who connected, as the CONNECT says: what a connection keeps of it for
/// its close line, for as long as it lives (the balancer has read the
/// whole client ID by then).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub version: Version,
    pub client_id: Logged,
    pub username: Option<Logged>,
    /// Seconds; 0: none.
    pub keepalive: u16,
}

impl From<&Connect> for Session {
    fn from(c: &Connect) -> Session {
        Session {
            version: c.version,
            client_id: Logged::new(&c.client_id),
            username: c.username.as_deref().map(Logged::new),
            keepalive: c.keepalive,
        }
    }
}

/// The client's own words are kept and logged at most this many
/// characters long.
const LOGGED_CHARS: usize = 64;

impl fmt::Display for Session {
    /// The close line's and rejection lines' fields.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client_id={}", self.client_id)?;
        match &self.username {
            Some(u) => write!(f, " username={u}")?,
            None => f.write_str(" username=-")?,
        }
        write!(f, " mqtt_version={}", self.version)
    }
}

/// A client-chosen string as a connection keeps it for its log lines: at
/// most LOGGED_CHARS characters (a CONNECT may carry 64 KiB of them, which
/// a connection held for days must not), and whether it was cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    text: String,
    cut: bool,
}

impl Logged {
    pub fn new(s: &str) -> Logged {
        let text: String = s.chars().take(LOGGED_CHARS).collect();
        Logged {
            cut: text.len() < s.len(),
            text,
        }
    }
}

impl Logged {
    /// What was kept, unquoted (for a JSON field, which escapes itself).
    pub fn text(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Logged {
    /// Quoted, with quotes, backslashes and control characters escaped and
    /// a cut marked `...`, so it cannot forge fields or lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        for c in self.text.chars() {
            write!(f, "{}", c.escape_debug())?;
        }
        if self.cut {
            f.write_str("...")?;
        }
        f.write_str("\"")
    }
}

/// Why no CONNECT was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoConnect {
    Refused(Refusal),
    /// Not whole within mqtt-connect-timeout.
    Timeout,
    /// The client closed (or reset) before it was whole.
    Closed,
}

impl NoConnect {
    /// The `reason` label of `splicer_mqtt_connect_rejections`.
    pub fn label(self) -> &'static str {
        match self {
            NoConnect::Refused(Refusal::NotConnect) => "not_connect",
            NoConnect::Refused(Refusal::Malformed(_)) => "malformed",
            NoConnect::Refused(Refusal::ProtocolError(_)) => "protocol_error",
            NoConnect::Refused(Refusal::IdentifierRejected(_)) => "identifier_rejected",
            NoConnect::Refused(Refusal::UnsupportedVersion(_)) => "unsupported_version",
            NoConnect::Refused(Refusal::TooLarge) => "too_large",
            NoConnect::Timeout => "timeout",
            NoConnect::Closed => "closed",
        }
    }
}

impl fmt::Display for NoConnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoConnect::Refused(r) => r.fmt(f),
            NoConnect::Timeout => f.write_str("no whole CONNECT within mqtt-connect-timeout"),
            NoConnect::Closed => f.write_str("closed before a whole CONNECT"),
        }
    }
}

/// Every label `NoConnect::label` gives, for the metric's series.
pub const NO_CONNECT_LABELS: [&str; 8] = [
    "not_connect",
    "malformed",
    "protocol_error",
    "identifier_rejected",
    "unsupported_version",
    "too_large",
    "timeout",
    "closed",
];

/// How the CONNECT comes: as the first bytes (`protocol = "mqtt"`), or in
/// the first binary WebSocket frames after the upgrade (`mqtt-ws`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Tcp,
    WebSocket,
}

/// Reads the client's CONNECT, leaving its bytes in `inbox` (they go to the
/// broker as they came: the frames, over WebSocket). On a refusal the
/// client has been answered and half-closed.
pub async fn read_connect(
    opts: &MqttOptions,
    inbox: &mut Inbox<'_, Client>,
    framing: Framing,
) -> Result<Connect, NoConnect> {
    let limit = opts.connect_timeout;
    // The CONNECT's version, for an answer the client can read.
    let (read, level) = match framing {
        Framing::Tcp => {
            let mut r = MqttConnect::new(opts.connect_max);
            let read = tokio::time::timeout(limit, inbox.look(&mut r)).await;
            (read, mqtt::level(inbox.held()))
        }
        Framing::WebSocket => {
            let mut r = MqttConnectInWs::new(opts.connect_max);
            let read = tokio::time::timeout(limit, inbox.look(&mut r)).await;
            (read, mqtt::level(r.message()))
        }
    };
    let why = match read {
        Ok(Ok((connect, _))) => return Ok(connect),
        Ok(Err(ReadError::Refused(r))) => NoConnect::Refused(r),
        Ok(Err(ReadError::Closed)) => NoConnect::Closed,
        Err(_) => NoConnect::Timeout,
    };
    // A broker closes a client too slow to send its CONNECT without a word
    // (MQTT 3.1.4); one that closed has nobody left to answer.
    if let NoConnect::Refused(r) = why {
        let connack = r.connack(level);
        let answer = match framing {
            Framing::Tcp => connack.unwrap_or_default().to_vec(),
            Framing::WebSocket => {
                let mut frames = connack.map(|c| ws_frame::server_frame(ws_frame::BINARY, c)).unwrap_or_default();
                let status = if r == Refusal::TooLarge { 1009 } else { 1002 };
                frames.extend(ws_frame::close_frame(status));
                frames
            }
        };
        inbox.stream().answer_and_close(&answer).await;
    }
    Err(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_fields_are_quoted_escaped_and_capped() {
        let s = Session {
            version: Version::V5,
            client_id: Logged::new("a\"b c\\d\n"),
            username: None,
            keepalive: 0,
        };
        assert_eq!(s.to_string(), r#"client_id="a\"b c\\d\n" username=- mqtt_version=5.0"#);
        let s = Session {
            version: Version::V3_1_1,
            client_id: Logged::new(&"é".repeat(100)),
            username: Some(Logged::new("u")),
            keepalive: 0,
        };
        assert_eq!(s.client_id.text.len(), 128, "64 characters kept, not 100");
        assert_eq!(
            s.to_string(),
            format!("client_id=\"{}...\" username=\"u\" mqtt_version=3.1.1", "é".repeat(64))
        );
        assert!(!Logged::new(&"x".repeat(64)).cut);
    }
}
