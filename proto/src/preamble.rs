//! The bytes a client (or, for a WebSocket upgrade, the broker) sends
//! before a connection can be spliced, read as they arrive: a `Reader` is
//! shown everything received so far after each new segment and says
//! whether the preamble is complete, incomplete, or refused.
//!
//! The readers keep what they learnt between calls, so the work per
//! connection stays proportional to the bytes received: the PROXY reader's
//! parse only ever looks at the first 107 bytes (v1) or the 16-byte prefix
//! (v2) until the header is whole, and the HTTP readers parse a head only
//! when a segment could have ended its first line or the head itself, not
//! once per segment. The listener (splicer's ingress) and the fuzz targets
//! drive these same readers.
use crate::{
    http_upgrade::{self, Head, Refusal, ResponseHead},
    mqtt,
    proxy_protocol::{self, Header, ParseError, Versions},
    tls_hello::{self, ClientHello, Records},
    ws_frame::{self, BINARY, CLOSE, CONTINUATION, TEXT},
};

/// What a reader says about the bytes so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<T, E> {
    /// A complete preamble: its value and its length in bytes.
    Done(T, usize),
    /// Incomplete; more bytes may complete it.
    More,
    /// Refused: more bytes cannot help.
    Fail(E),
}

pub trait Reader {
    type Value;
    type Error;
    /// `buf` is every byte received so far; between calls it only grows.
    /// (An end of stream while it says More is the caller's to report.)
    fn step(&mut self, buf: &[u8]) -> Step<Self::Value, Self::Error>;
}

/// A PROXY protocol header of the accepted versions, at most `max` bytes.
pub struct ProxyHeader {
    versions: Versions,
    max: usize,
}

impl ProxyHeader {
    pub fn new(versions: Versions, max: usize) -> Self {
        ProxyHeader { versions, max }
    }
}

impl Reader for ProxyHeader {
    type Value = Header;
    type Error = ParseError;

    fn step(&mut self, buf: &[u8]) -> Step<Header, ParseError> {
        match proxy_protocol::parse_within(buf, self.versions, self.max) {
            Ok(h) => {
                let len = h.len;
                Step::Done(h, len)
            }
            Err(ParseError::Incomplete) if buf.len() >= self.max => Step::Fail(ParseError::TooLong),
            Err(ParseError::Incomplete) => Step::More,
            Err(e) => Step::Fail(e),
        }
    }
}

/// An MQTT CONNECT, at most `max` bytes. `mqtt::parse_connect` looks at
/// a bounded prefix until the packet's length has arrived, then parses it
/// once.
pub struct MqttConnect {
    max: usize,
}

impl MqttConnect {
    pub fn new(max: usize) -> Self {
        MqttConnect { max }
    }
}

impl Reader for MqttConnect {
    type Value = mqtt::Connect;
    type Error = mqtt::Refusal;

    fn step(&mut self, buf: &[u8]) -> Step<mqtt::Connect, mqtt::Refusal> {
        match mqtt::parse_connect(buf, self.max) {
            Ok(Some(c)) => {
                let len = c.len;
                Step::Done(c, len)
            }
            Ok(None) => Step::More,
            Err(e) => Step::Fail(e),
        }
    }
}

/// An MQTT CONNECT at the front of the binary WebSocket messages a client
/// sends after the upgrade (`mqtt-ws` listeners): frames are unmasked as
/// they arrive, partial ones included, into the message bytes, which
/// `mqtt::parse_connect` reads. MQTT over WebSocket lets a CONNECT span
/// frames and messages, and share one with what follows. Pings and pongs
/// in between are skipped; a text or close frame first is not MQTT.
///
/// Frames are read only until the message bytes hold a whole CONNECT (or
/// one that is refused): what follows it (a PUBLISH, a DISCONNECT and a
/// Close) is the broker's to read. `Done`'s length covers the frame bytes
/// read so far; the caller sends them, and those behind, as they came.
/// Frame headers do not count toward `max`, but the raw bytes are capped
/// at twice it, so a client cannot hold a handshake's buffer open with
/// empty frames.
pub struct MqttConnectInWs {
    max: usize,
    /// Raw bytes consumed: frame headers and payload bytes unmasked.
    scanned: usize,
    /// The frame being read and how much of its payload has been.
    frame: Option<(ws_frame::Head, u64)>,
    /// A data message has begun and not yet ended (continuations next).
    in_message: bool,
    /// The data frames' payloads, unmasked.
    message: Vec<u8>,
}

impl MqttConnectInWs {
    pub fn new(max: usize) -> Self {
        MqttConnectInWs {
            max,
            scanned: 0,
            frame: None,
            in_message: false,
            message: Vec::new(),
        }
    }

    /// Takes in the frame bytes that have arrived past `scanned`.
    fn unframe(&mut self, buf: &[u8]) -> Result<(), mqtt::Refusal> {
        use mqtt::Refusal::{Malformed, NotConnect};
        loop {
            let (head, done) = match &mut self.frame {
                Some((h, d)) => (*h, d),
                None => {
                    // Between frames: stop once the CONNECT is whole (or
                    // refused); `step` parses it again to say so.
                    if !matches!(mqtt::parse_connect(&self.message, self.max), Ok(None)) {
                        return Ok(());
                    }
                    let Some(h) = ws_frame::client_head(&buf[self.scanned..]).map_err(Malformed)? else {
                        return Ok(());
                    };
                    match (h.opcode, self.in_message) {
                        (BINARY, false) | (CONTINUATION, true) => self.in_message = !h.fin,
                        (TEXT | BINARY, true) | (CONTINUATION, false) => {
                            return Err(Malformed("WebSocket frames out of order"))
                        }
                        // Text, or a close before the CONNECT: not MQTT.
                        (TEXT | CLOSE, false) => return Err(NotConnect),
                        _ => {} // a ping or pong: skipped
                    }
                    self.scanned += h.len;
                    let (h, d) = self.frame.insert((h, 0));
                    (*h, d)
                }
            };
            let left = head.payload_len - *done;
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len() - self.scanned);
            if matches!(head.opcode, BINARY | CONTINUATION) {
                let from = *done as usize;
                let bytes = &buf[self.scanned..self.scanned + n];
                self.message
                    .extend(bytes.iter().enumerate().map(|(i, b)| b ^ head.mask[(from + i) % 4]));
            }
            self.scanned += n;
            *done += n as u64;
            if *done < head.payload_len {
                return Ok(());
            }
            self.frame = None;
        }
    }
}

impl Reader for MqttConnectInWs {
    type Value = mqtt::Connect;
    type Error = mqtt::Refusal;

    fn step(&mut self, buf: &[u8]) -> Step<mqtt::Connect, mqtt::Refusal> {
        if let Err(e) = self.unframe(buf) {
            return Step::Fail(e);
        }
        match mqtt::parse_connect(&self.message, self.max) {
            Ok(Some(c)) => Step::Done(c, self.scanned),
            Ok(None) if buf.len() > 2 * self.max => Step::Fail(mqtt::Refusal::TooLarge),
            Ok(None) => Step::More,
            Err(e) => Step::Fail(e),
        }
    }
}

impl MqttConnectInWs {
    /// The message bytes so far (for the CONNACK's version).
    pub fn message(&self) -> &[u8] {
        &self.message
    }
}

/// A TLS ClientHello (`tls-passthrough`), its handshake message at most
/// `max` bytes; records are taken as they complete (tls_hello::Records).
pub struct TlsClientHello(Records);

impl TlsClientHello {
    pub fn new(max: usize) -> Self {
        TlsClientHello(Records::new(max))
    }
}

impl Reader for TlsClientHello {
    type Value = ClientHello;
    type Error = tls_hello::Refusal;

    fn step(&mut self, buf: &[u8]) -> Step<ClientHello, tls_hello::Refusal> {
        match self.0.feed(buf) {
            Ok(Some(h)) => {
                let len = h.len;
                Step::Done(h, len)
            }
            Ok(None) => Step::More,
            Err(e) => Step::Fail(e),
        }
    }
}

/// An HTTP head (a request or a response), at most `max` bytes, parsed by
/// `parse` whenever `HeadEnd` says it may be complete.
pub struct HttpHead<T, E> {
    max: usize,
    end: HeadEnd,
    parse: fn(&[u8], usize) -> Result<Option<T>, E>,
    too_large: fn(usize) -> E,
}

/// A WebSocket upgrade request head.
pub type UpgradeRequest = HttpHead<Head, Refusal>;
/// The broker's answer to an upgrade request: its status line and fields.
pub type UpgradeResponse = HttpHead<ResponseHead, String>;

impl UpgradeRequest {
    pub fn new(max: usize) -> Self {
        HttpHead {
            max,
            end: HeadEnd::default(),
            parse: http_upgrade::parse_head,
            too_large: |_| Refusal::TooLarge,
        }
    }
}

impl UpgradeResponse {
    pub fn new(max: usize) -> Self {
        HttpHead {
            max,
            end: HeadEnd::default(),
            parse: |buf, _| http_upgrade::parse_response_head(buf),
            too_large: |max| format!("response head longer than {max} bytes"),
        }
    }
}

/// A head's length, for `Step::Done`.
pub trait HeadLen {
    fn head_len(&self) -> usize;
}

impl HeadLen for Head {
    fn head_len(&self) -> usize {
        self.len
    }
}

impl HeadLen for ResponseHead {
    fn head_len(&self) -> usize {
        self.len
    }
}

impl<T: HeadLen, E> Reader for HttpHead<T, E> {
    type Value = T;
    type Error = E;

    fn step(&mut self, buf: &[u8]) -> Step<T, E> {
        let complete = match self.end.worth_parsing(buf) {
            true => (self.parse)(buf, self.max),
            false => Ok(None),
        };
        match complete {
            Ok(Some(head)) => {
                let len = head.head_len();
                Step::Done(head, len)
            }
            Ok(None) if buf.len() >= self.max => Step::Fail((self.too_large)(self.max)),
            Ok(None) => Step::More,
            Err(e) => Step::Fail(e),
        }
    }
}

/// Where an HTTP head being received may be worth parsing: once its first
/// line has ended (so a malformed request line is refused early), and
/// whenever a new segment holds a blank line (LF LF or LF CR LF: what ends
/// a head for httparse). Each byte is looked at once.
#[derive(Debug, Default)]
struct HeadEnd {
    /// Bytes already looked at.
    scanned: usize,
    /// Where the head starts, past the empty lines a request may start
    /// with (RFC 9112 2.2).
    start: Option<usize>,
    first_line_ended: bool,
}

impl HeadEnd {
    fn worth_parsing(&mut self, buf: &[u8]) -> bool {
        let from = self.scanned.min(buf.len());
        self.scanned = buf.len();
        let start = match self.start {
            Some(s) => s,
            None => match buf[from..].iter().position(|&b| b != b'\r' && b != b'\n') {
                Some(p) => *self.start.insert(from + p),
                None => return false,
            },
        };
        let mut worth = false;
        if !self.first_line_ended && buf[from.max(start)..].contains(&b'\n') {
            self.first_line_ended = true;
            worth = true;
        }
        // A blank line may straddle two segments: look two bytes back.
        let tail = &buf[from.saturating_sub(2).max(start)..];
        worth || tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &[u8] = b"GET /mqtt HTTP/1.1\r\nHost: b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    /// Feeds `input` in pieces of `n` bytes, as a socket might deliver it.
    fn feed<R: Reader>(r: &mut R, input: &[u8], n: usize) -> Step<R::Value, R::Error> {
        let mut end = 0;
        loop {
            end = (end + n).min(input.len());
            match r.step(&input[..end]) {
                Step::More if end < input.len() => {}
                other => return other,
            }
        }
    }

    #[test]
    fn the_same_result_whatever_the_segments() {
        let mut with_frames = UPGRADE.to_vec();
        with_frames.extend_from_slice(&[0x82, 0x80, 1, 2, 3, 4]);
        for n in [1, 2, 3, 7, 64, 4096] {
            match feed(&mut UpgradeRequest::new(16384), &with_frames, n) {
                Step::Done(h, len) => assert_eq!((h.target.as_str(), len), ("/mqtt", UPGRADE.len()), "{n}"),
                other => panic!("{n}: {other:?}"),
            }
            let connect = b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x03abc\xc0\x00";
            match feed(&mut MqttConnect::new(1024), connect, n) {
                Step::Done(c, len) => assert_eq!((c.client_id.as_str(), len), ("abc", connect.len() - 2)),
                other => panic!("{n}: {other:?}"),
            }
            let v1 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nMQTT";
            match feed(&mut ProxyHeader::new(Versions::Auto, 4096), v1, n) {
                Step::Done(h, len) => assert_eq!((h.version, len), (proxy_protocol::Version::V1, v1.len() - 4)),
                other => panic!("{n}: {other:?}"),
            }
        }
    }

    /// A client frame as MQTT.js or a browser sends it.
    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = vec![first, 0x80 | payload.len() as u8];
        f.extend(mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    const CONNECT: &[u8] = b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x03abc";

    #[test]
    fn a_connect_in_websocket_frames_whatever_the_framing_and_segments() {
        let publish = b"\x30\x03\x00\x01t";
        let framings: Vec<Vec<u8>> = vec![
            // One frame with the CONNECT and a PUBLISH behind it.
            masked(0x82, &[CONNECT, publish].concat()),
            // Fragmented: binary, a ping between, two continuations.
            [masked(0x02, &CONNECT[..3]), masked(0x89, b"hi"), masked(0x00, &CONNECT[3..9]), masked(0x80, &CONNECT[9..])]
                .concat(),
            // Two messages.
            [masked(0x82, &CONNECT[..5]), masked(0x82, &CONNECT[5..])].concat(),
        ];
        for framed in &framings {
            for n in [1, 2, 5, 4096] {
                match feed(&mut MqttConnectInWs::new(1024), framed, n) {
                    Step::Done(c, len) => {
                        assert_eq!(c.client_id, "abc");
                        assert!(len <= framed.len());
                    }
                    other => panic!("{n}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn what_is_not_a_connect_in_websocket_frames_is_refused() {
        use mqtt::Refusal::*;
        let refused = |bytes: &[u8]| match MqttConnectInWs::new(1024).step(bytes) {
            Step::Fail(e) => e,
            other => panic!("{other:?}"),
        };
        assert_eq!(refused(&masked(0x81, CONNECT)), NotConnect, "text frame");
        assert_eq!(refused(&masked(0x88, b"\x03\xe8")), NotConnect, "close first");
        assert!(matches!(refused(&[0x82, 0x0f]), Malformed(_)), "unmasked");
        assert!(matches!(refused(&masked(0x80, CONNECT)), Malformed(_)), "continuation first");
        assert_eq!(refused(&masked(0x82, b"GET / HTTP/1.1\r\n")), NotConnect);
        // What follows a whole CONNECT is not read: a Close right behind
        // it (a client that connects, publishes and leaves) is the broker's.
        let then_close = [masked(0x82, CONNECT), masked(0x88, b"\x03\xe8")].concat();
        match MqttConnectInWs::new(1024).step(&then_close) {
            Step::Done(c, len) => assert_eq!((c.client_id.as_str(), len), ("abc", 6 + CONNECT.len())),
            other => panic!("{other:?}"),
        }
        // Empty frames cannot hold the buffer past twice the limit.
        let empties: Vec<u8> = (0..200).flat_map(|_| masked(0x89, b"")).collect();
        assert_eq!(MqttConnectInWs::new(128).step(&empties), Step::Fail(TooLarge));
    }

    #[test]
    fn a_head_is_parsed_once_its_first_line_ends_and_when_it_may_end() {
        let mut e = HeadEnd::default();
        let parses: Vec<usize> = (1..=UPGRADE.len()).filter(|&n| e.worth_parsing(&UPGRADE[..n])).collect();
        let first_lf = UPGRADE.iter().position(|&b| b == b'\n').unwrap() + 1;
        assert_eq!(parses, [first_lf, UPGRADE.len()]);
        // Leading empty lines are skipped, and not taken for a blank line.
        let mut e = HeadEnd::default();
        assert!(!e.worth_parsing(b"\r\n\r\n\n"));
        assert!(!e.worth_parsing(b"\r\n\r\n\nGE"));
        assert!(e.worth_parsing(b"\r\n\r\n\nGET / HTTP/1.1\n"));
    }

    #[test]
    fn garbage_is_refused_at_the_first_line_not_at_the_limit() {
        let mut r = UpgradeRequest::new(16384);
        assert_eq!(r.step(b"\x01\x02 nonsense"), Step::More);
        assert!(matches!(r.step(b"\x01\x02 nonsense\r\n"), Step::Fail(Refusal::BadRequest(_))));
    }

    #[test]
    fn limits() {
        let mut r = UpgradeRequest::new(64);
        assert_eq!(r.step(&[b'a'; 64]), Step::Fail(Refusal::TooLarge));
        let mut r = ProxyHeader::new(Versions::V1, 4096);
        assert_eq!(r.step(&[b'P'; 1]), Step::More);
        assert_eq!(r.step(b"PROXY TCP4 1.2.3.4"), Step::More);
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert_eq!(r.step(&long), Step::Fail(ParseError::TooLong));
    }

    #[test]
    fn responses() {
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x82\x00";
        match feed(&mut UpgradeResponse::new(16384), ok, 5) {
            Step::Done(h, len) => assert_eq!((h.status, len, h.content_length, h.to_websocket), (101, ok.len() - 2, None, true)),
            other => panic!("{other:?}"),
        }
        let no = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\n\r\nno!";
        match feed(&mut UpgradeResponse::new(16384), no, 1) {
            Step::Done(h, len) => assert_eq!((h.status, len, h.content_length), (400, no.len() - 3, Some(3))),
            other => panic!("{other:?}"),
        }
        assert!(matches!(UpgradeResponse::new(100).step(b"SSH-2.0-x\r\n"), Step::Fail(_)));
    }
}
