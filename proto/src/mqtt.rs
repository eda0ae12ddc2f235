//! The MQTT CONNECT packet a client must send first (MQTT 3.1, 3.1.1 and
//! 5.0), for `protocol = "mqtt"` listeners (issue 13): checked as strictly
//! as a broker would, so that what is not MQTT is refused before any
//! upstream is touched, and read for who connects (client ID, username,
//! version, keep-alive). The password is skipped, never kept.
//!
//! Written here rather than taken from an MQTT crate: those that parse from
//! a byte slice (rumqttc's mqttbytes, mqttrs, rmqtt-codec, ntex-mqtt's
//! codec) each copy the password, or lack MQTT 3.1 or 5.0, or accept a set
//! reserved flag. This reads one packet from the front of a buffer and
//! says whether more bytes are needed, like the PROXY parser.
use std::fmt;

/// The protocol level a client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// 3.1: protocol name "MQIsdp", level 3.
    V3_1,
    /// 3.1.1: "MQTT", level 4.
    V3_1_1,
    /// 5.0: "MQTT", level 5.
    V5,
}

/// A CONNECT as read. The packet's bytes are `buf[..len]`, forwarded to
/// the broker unchanged.
#[derive(Clone, PartialEq, Eq)]
pub struct Connect {
    pub version: Version,
    pub client_id: String,
    pub username: Option<String>,
    /// Seconds; 0: no keep-alive.
    pub keepalive: u16,
    pub clean_start: bool,
    /// Length of the whole packet (fixed header included).
    pub len: usize,
}

/// Debug without anything a log should not repeat at length: the client ID
/// and username are the client's own words, shown by the caller escaped
/// and capped; the password is not here at all.
impl fmt::Debug for Connect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connect")
            .field("version", &self.version)
            .field("client_id_len", &self.client_id.len())
            .field("username", &self.username.is_some())
            .field("keepalive", &self.keepalive)
            .field("clean_start", &self.clean_start)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// Why the first packet is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The first byte is not a CONNECT's 0x10 (HTTP, a TLS ClientHello,
    /// other MQTT packets, garbage).
    NotConnect,
    /// A CONNECT that breaks the specification; says where.
    Malformed(&'static str),
    /// Well formed, but against MQTT 5's rules (a property given twice, a
    /// zero receive maximum): what MQTT 5 calls a Protocol Error.
    ProtocolError(&'static str),
    /// A client ID a broker must refuse: empty in MQTT 3.1, or empty with
    /// a persistent session in 3.1.1.
    IdentifierRejected(&'static str),
    /// A protocol level this parser does not know (an MQTT 5 client gets
    /// CONNACK 0x84, a 3.x one return code 0x01).
    UnsupportedVersion(u8),
    /// Longer than the listener's limit (`mqtt-connect-max`).
    TooLarge,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotConnect => f.write_str("first packet is not an MQTT CONNECT"),
            Refusal::Malformed(what) => write!(f, "malformed CONNECT: {what}"),
            Refusal::ProtocolError(what) => write!(f, "CONNECT against the protocol: {what}"),
            Refusal::IdentifierRejected(what) => write!(f, "client ID rejected: {what}"),
            Refusal::UnsupportedVersion(v) => write!(f, "unsupported MQTT protocol level {v}"),
            Refusal::TooLarge => f.write_str("CONNECT longer than the limit"),
        }
    }
}

impl Refusal {
    /// The CONNACK a broker would send before closing, if any: MQTT 5
    /// clients get a reason code (0x81 malformed, 0x82 protocol error,
    /// 0x84 unsupported version, 0x95 packet too large); a 3.x client gets
    /// return code 0x01 for an unknown level and 0x02 for a rejected
    /// client ID; anything else is just closed.
    pub fn connack(self, level: Option<u8>) -> Option<&'static [u8]> {
        match (self, level) {
            (Refusal::UnsupportedVersion(_), Some(5..)) => Some(&[0x20, 0x03, 0x00, 0x84, 0x00]),
            (Refusal::UnsupportedVersion(_), _) => Some(&[0x20, 0x02, 0x00, 0x01]),
            (Refusal::Malformed(_), Some(5)) => Some(&[0x20, 0x03, 0x00, 0x81, 0x00]),
            (Refusal::ProtocolError(_), Some(5)) => Some(&[0x20, 0x03, 0x00, 0x82, 0x00]),
            (Refusal::IdentifierRejected(_), _) => Some(&[0x20, 0x02, 0x00, 0x02]),
            (Refusal::TooLarge, Some(5)) => Some(&[0x20, 0x03, 0x00, 0x95, 0x00]),
            _ => None,
        }
    }
}

/// The CONNACK a broker sends when it cannot take the client now: return
/// code 0x03 "server unavailable" (3.x), reason 0x88 (5.0). For a client
/// whose CONNECT was read when no upstream would take it: it backs off as
/// it would from its broker.
pub fn unavailable(version: Version) -> &'static [u8] {
    match version {
        Version::V5 => &[0x20, 0x03, 0x00, 0x88, 0x00],
        Version::V3_1 | Version::V3_1_1 => &[0x20, 0x02, 0x00, 0x03],
    }
}

impl fmt::Display for Version {
    /// As the close line's `mqtt_version=` and the metrics' label say it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::V3_1 => "3.1",
            Version::V3_1_1 => "3.1.1",
            Version::V5 => "5.0",
        })
    }
}

/// The protocol level byte of a CONNECT at the front of `buf`, if that far
/// has arrived: what `Refusal::connack` needs to answer in the client's
/// own version.
pub fn level(buf: &[u8]) -> Option<u8> {
    let (_, header) = remaining_length(buf).ok()??;
    let name_len = usize::from(u16::from_be_bytes([*buf.get(header)?, *buf.get(header + 1)?]));
    buf.get(header + 2 + name_len).copied()
}

/// How much of an incomplete CONNECT's body is checked before the rest
/// arrives: the protocol name and level, the flags, the keep-alive, and
/// the start of what follows.
const EARLY: usize = 64;

/// Reads the CONNECT at the front of `buf`: Ok(None) while it is
/// incomplete (and no longer than `max`), Ok(Some) once it is whole and
/// valid, Err as soon as the bytes so far cannot become one. Work is
/// proportional to the packet's length.
pub fn parse_connect(buf: &[u8], max: usize) -> Result<Option<Connect>, Refusal> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    // A CONNECT's first byte is exactly 0x10. A TLS ClientHello's (0x16)
    // has the CONNECT type with flags set: not a CONNECT either.
    if first != 0x10 {
        return Err(Refusal::NotConnect);
    }
    let Some((remaining, header)) = remaining_length(buf)? else {
        return Ok(None);
    };
    let len = header + remaining;
    if len > max {
        return Err(Refusal::TooLarge);
    }
    if buf.len() < len {
        // What has arrived must still be able to start a CONNECT: refuse a
        // wrong protocol name or level without waiting for the rest. Only
        // the first EARLY bytes are looked at, so a long CONNECT dripped a
        // byte at a time costs work in proportion to its bytes, not to
        // their square.
        let early = &buf[header..buf.len().min(header + EARLY)];
        return match body(early, true) {
            Err(r) => Err(r),
            Ok(_) => Ok(None),
        };
    }
    let mut c = body(&buf[header..len], false)?.expect("a whole body parses to a result");
    c.len = len;
    Ok(Some(c))
}

/// Appends `n` as MQTT's variable-length integer (the remaining length, a
/// property list's length): seven bits a byte, low first. For building
/// packets (tests, the bench's client).
pub fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        out.push(if n > 0 { byte | 0x80 } else { byte });
        if n == 0 {
            return;
        }
    }
}

/// The remaining length (a variable-length integer of at most four bytes,
/// in its shortest form) after the first byte: (value, header length).
fn remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>, Refusal> {
    let mut value = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if i > 0 && b == 0 {
                return Err(Refusal::Malformed("remaining length not in its shortest form"));
            }
            return Ok(Some((value, 2 + i)));
        }
    }
    Err(Refusal::Malformed("remaining length over four bytes"))
}

/// The variable header and payload. With `partial`, `b` may be cut short:
/// running out of bytes is then Ok(None) instead of an error.
fn body(b: &[u8], partial: bool) -> Result<Option<Connect>, Refusal> {
    let mut r = Reader { b, at: 0 };
    match connect_body(&mut r) {
        Ok(c) if r.at == b.len() => Ok(Some(c)),
        Ok(_) => Err(Refusal::Malformed("bytes after the payload")),
        Err(Short) if partial => Ok(None),
        Err(Short) => Err(Refusal::Malformed("fields run past the remaining length")),
        Err(Bad(r)) => Err(r),
    }
}

/// How reading a field failed.
enum Fail {
    /// The bytes ran out.
    Short,
    Bad(Refusal),
}
use Fail::{Bad, Short};

fn malformed(what: &'static str) -> Fail {
    Bad(Refusal::Malformed(what))
}

fn connect_body(r: &mut Reader) -> Result<Connect, Fail> {
    let name = r.binary()?;
    let level = r.u8()?;
    let version = match (name, level) {
        (b"MQIsdp", 3) => Version::V3_1,
        (b"MQTT", 4) => Version::V3_1_1,
        (b"MQTT", 5) => Version::V5,
        (b"MQTT" | b"MQIsdp", l) => return Err(Bad(Refusal::UnsupportedVersion(l))),
        _ => return Err(malformed("protocol name")),
    };
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(malformed("reserved connect flag set"));
    }
    let (will, will_qos, will_retain) = (flags & 0x04 != 0, (flags >> 3) & 3, flags & 0x20 != 0);
    let (has_password, has_username) = (flags & 0x40 != 0, flags & 0x80 != 0);
    if will_qos == 3 {
        return Err(malformed("will QoS 3"));
    }
    if !will && (will_qos != 0 || will_retain) {
        return Err(malformed("will QoS or retain without a will"));
    }
    if version != Version::V5 && has_password && !has_username {
        return Err(malformed("password without a username"));
    }
    let keepalive = r.u16()?;
    if version == Version::V5 {
        properties(r, CONNECT_PROPERTIES)?;
    }
    let client_id = r.string()?;
    let clean_start = flags & 0x02 != 0;
    if client_id.is_empty() {
        match version {
            Version::V3_1 => return Err(Bad(Refusal::IdentifierRejected("empty in MQTT 3.1"))),
            Version::V3_1_1 if !clean_start => {
                return Err(Bad(Refusal::IdentifierRejected("empty, with a persistent session")))
            }
            _ => {}
        }
    }
    if will {
        if version == Version::V5 {
            properties(r, WILL_PROPERTIES)?;
        }
        r.string()?; // topic
        r.binary()?; // payload
    }
    let username = if has_username { Some(r.string()?) } else { None };
    if has_password {
        r.binary()?; // read past, never kept
    }
    Ok(Connect {
        version,
        client_id,
        username,
        keepalive,
        clean_start,
        len: 0,
    })
}

/// A property's value type (MQTT 5, 2.2.2.2).
#[derive(Clone, Copy)]
enum Kind {
    Byte,
    U16NonZero,
    U16,
    U32,
    U32NonZero,
    Str,
    Bin,
    Pair,
}

/// (identifier, type, may repeat) for the CONNECT's properties (3.1.2.11).
const CONNECT_PROPERTIES: &[(u8, Kind, bool)] = &[
    (0x11, Kind::U32, false),        // session expiry interval
    (0x21, Kind::U16NonZero, false), // receive maximum
    (0x27, Kind::U32NonZero, false), // maximum packet size
    (0x22, Kind::U16, false),        // topic alias maximum
    (0x19, Kind::Byte, false),       // request response information
    (0x17, Kind::Byte, false),       // request problem information
    (0x26, Kind::Pair, true),        // user property
    (0x15, Kind::Str, false),        // authentication method
    (0x16, Kind::Bin, false),        // authentication data
];

/// The will's properties (3.1.3.2).
const WILL_PROPERTIES: &[(u8, Kind, bool)] = &[
    (0x18, Kind::U32, false), // will delay interval
    (0x01, Kind::Byte, false), // payload format indicator
    (0x02, Kind::U32, false), // message expiry interval
    (0x03, Kind::Str, false), // content type
    (0x08, Kind::Str, false), // response topic
    (0x09, Kind::Bin, false), // correlation data
    (0x26, Kind::Pair, true), // user property
];

/// A property list: its length, then properties from `allowed`, each at
/// most once unless it may repeat, whose values fit their types.
fn properties(r: &mut Reader, allowed: &[(u8, Kind, bool)]) -> Result<(), Fail> {
    let len = r.varint()?;
    let end = r.at.checked_add(len).ok_or(Short)?;
    if end > r.b.len() {
        return Err(Short);
    }
    let mut seen = 0u64;
    let mut p = Reader { b: &r.b[..end], at: r.at };
    while p.at < end {
        let id = p.u8()?;
        let Some(&(_, kind, repeats)) = allowed.iter().find(|(i, ..)| *i == id) else {
            return Err(malformed("property not allowed here"));
        };
        let bit = 1u64 << (id & 63);
        if !repeats && seen & bit != 0 {
            return Err(Bad(Refusal::ProtocolError("property given twice")));
        }
        seen |= bit;
        // Inside the list, running out of bytes is malformed, not short:
        // the list's length said they were there.
        let value = match kind {
            Kind::Byte => p.u8().map(|v| v <= 1).map_err(|_| ()),
            Kind::U16 => p.u16().map(|_| true).map_err(|_| ()),
            Kind::U16NonZero => p.u16().map(|v| v != 0).map_err(|_| ()),
            Kind::U32 => p.u32().map(|_| true).map_err(|_| ()),
            Kind::U32NonZero => p.u32().map(|v| v != 0).map_err(|_| ()),
            Kind::Str => p.string().map(|_| true).map_err(|_| ()),
            Kind::Bin => p.binary().map(|_| true).map_err(|_| ()),
            Kind::Pair => p.string().and_then(|_| p.string()).map(|_| true).map_err(|_| ()),
        };
        match value {
            Ok(true) => {}
            Ok(false) => return Err(Bad(Refusal::ProtocolError("property value out of range"))),
            Err(()) => return Err(malformed("property runs past its list")),
        }
    }
    r.at = end;
    Ok(())
}

/// A cursor over the body; every read says Short when the bytes run out.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Fail> {
        let end = self.at.checked_add(n).ok_or(Short)?;
        let s = self.b.get(self.at..end).ok_or(Short)?;
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, Fail> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Fail> {
        let s = self.take(2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }

    fn u32(&mut self) -> Result<u32, Fail> {
        let s = self.take(4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }

    /// Binary data: a two-byte length, then that many bytes.
    fn binary(&mut self) -> Result<&'a [u8], Fail> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    /// A UTF-8 string: valid UTF-8 without U+0000 (1.5.4).
    fn string(&mut self) -> Result<String, Fail> {
        let s = std::str::from_utf8(self.binary()?).map_err(|_| malformed("string not UTF-8"))?;
        if s.contains('\0') {
            return Err(malformed("string contains U+0000"));
        }
        Ok(s.to_owned())
    }

    /// A variable-length integer, as the remaining length.
    fn varint(&mut self) -> Result<usize, Fail> {
        let mut value = 0usize;
        for i in 0..4 {
            let b = self.u8()?;
            value |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return Err(malformed("variable integer not in its shortest form"));
                }
                return Ok(value);
            }
        }
        Err(malformed("variable integer over four bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A will: MQTT 5 properties (without their length), topic, payload.
    type Will = (Option<Vec<u8>>, &'static [u8], &'static [u8]);

    /// A CONNECT with the given fields; `props` are MQTT 5 property bytes
    /// (without their length).
    struct Builder {
        name: &'static [u8],
        level: u8,
        flags: u8,
        props: Option<Vec<u8>>,
        client_id: &'static [u8],
        will: Option<Will>,
        username: Option<&'static [u8]>,
        password: Option<&'static [u8]>,
    }

    fn b(level: u8) -> Builder {
        Builder {
            name: if level == 3 { b"MQIsdp" } else { b"MQTT" },
            level,
            flags: 0x02,
            props: (level == 5).then(Vec::new),
            client_id: b"dev-1",
            will: None,
            username: None,
            password: None,
        }
    }

    fn put(v: &mut Vec<u8>, s: &[u8]) {
        v.extend((s.len() as u16).to_be_bytes());
        v.extend(s);
    }

    impl Builder {
        fn bytes(&self) -> Vec<u8> {
            let mut body = Vec::new();
            put(&mut body, self.name);
            body.push(self.level);
            let mut flags = self.flags;
            if self.will.is_some() {
                flags |= 0x04;
            }
            if self.username.is_some() {
                flags |= 0x80;
            }
            if self.password.is_some() {
                flags |= 0x40;
            }
            body.push(flags);
            body.extend(30u16.to_be_bytes());
            if let Some(p) = &self.props {
                put_varint(&mut body, p.len());
                body.extend(p);
            }
            put(&mut body, self.client_id);
            if let Some((wp, topic, payload)) = &self.will {
                if let Some(p) = wp {
                    put_varint(&mut body, p.len());
                    body.extend(p);
                }
                put(&mut body, topic);
                put(&mut body, payload);
            }
            if let Some(u) = self.username {
                put(&mut body, u);
            }
            if let Some(p) = self.password {
                put(&mut body, p);
            }
            let mut out = vec![0x10];
            put_varint(&mut out, body.len());
            out.extend(body);
            out
        }
    }

    const MAX: usize = 64 << 10;

    fn whole(bytes: &[u8]) -> Connect {
        // Every strict prefix needs more; the whole packet parses.
        for cut in 0..bytes.len() {
            assert_eq!(parse_connect(&bytes[..cut], MAX), Ok(None), "prefix of {cut} bytes");
        }
        parse_connect(bytes, MAX).unwrap().unwrap()
    }

    #[test]
    fn reads_each_version() {
        for (level, version) in [(3, Version::V3_1), (4, Version::V3_1_1), (5, Version::V5)] {
            let bytes = b(level).bytes();
            let c = whole(&bytes);
            assert_eq!((c.version, c.client_id.as_str(), c.keepalive, c.len), (version, "dev-1", 30, bytes.len()));
            assert_eq!((c.username, c.clean_start), (None, true));
            assert_eq!(super::level(&bytes), Some(level));
        }
    }

    #[test]
    fn reads_username_skips_password_and_will() {
        for level in [4, 5] {
            let mut p = b(level);
            p.username = Some(b"alice");
            p.password = Some(b"s3cret");
            p.will = Some(((level == 5).then(|| vec![0x18, 0, 0, 0, 5, 0x01, 1]), b"t/will", b"bye"));
            let bytes = p.bytes();
            let c = whole(&bytes);
            assert_eq!(c.username.as_deref(), Some("alice"));
            assert!(!format!("{c:?}").contains("s3cret") && !format!("{c:?}").contains("alice"));
        }
    }

    #[test]
    fn reads_v5_properties() {
        let mut p = b(5);
        let mut props = vec![0x11, 0, 0, 0x0e, 0x10, 0x21, 0, 10, 0x27, 0, 1, 0, 0];
        props.extend([0x26, 0, 1, b'k', 0, 1, b'v', 0x26, 0, 1, b'k', 0, 1, b'w']);
        p.props = Some(props);
        assert_eq!(whole(&p.bytes()).client_id, "dev-1");
        // A large CONNECT: remaining length over one byte.
        p.client_id = b"a-client-id-that-is-long-enough-to-need-two-length-bytes-in-the-fixed-header-of-this-connect-packet-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        assert!(p.bytes()[1] & 0x80 != 0);
        whole(&p.bytes());
    }

    #[test]
    fn refuses_what_is_not_a_connect() {
        for bytes in [
            &b"GET /mqtt HTTP/1.1\r\n"[..],
            &[0x16, 0x03, 0x01, 0x02, 0x00][..], // a TLS ClientHello
            &[0x30, 0x05, 0, 1, b't', b'h', b'i'][..], // a PUBLISH
            &[0xc0, 0x00][..], // PINGREQ
        ] {
            assert_eq!(parse_connect(bytes, MAX), Err(Refusal::NotConnect));
            assert_eq!(parse_connect(&bytes[..1], MAX), Err(Refusal::NotConnect));
        }
        assert_eq!(parse_connect(&[0x12, 0x00], MAX), Err(Refusal::NotConnect));
    }

    #[test]
    fn refuses_malformed_connects() {
        let set = |f: fn(&mut Builder)| {
            let mut p = b(5);
            f(&mut p);
            p.bytes()
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (set(|p| p.flags |= 0x01), "reserved connect flag set"),
            (set(|p| p.flags |= 0x18), "will QoS 3"),
            (set(|p| p.flags |= 0x20), "will QoS or retain without a will"),
            (set(|p| p.name = b"MQTX"), "protocol name"),
            (set(|p| p.props = Some(vec![0x01, 1])), "property not allowed here"),
            (set(|p| p.props = Some(vec![0x11, 0, 0])), "property runs past its list"),
            (set(|p| p.client_id = b"a\0b"), "string contains U+0000"),
            (set(|p| p.client_id = b"\xff\xfe"), "string not UTF-8"),
        ];
        for (bytes, what) in cases {
            assert_eq!(parse_connect(&bytes, MAX), Err(Refusal::Malformed(what)), "{bytes:02x?}");
        }
        let mut p = b(4);
        p.password = Some(b"x");
        assert_eq!(parse_connect(&p.bytes(), MAX), Err(Refusal::Malformed("password without a username")));
        // Against MQTT 5's rules: a protocol error, not malformed.
        let mut p = b(5);
        p.props = Some(vec![0x21, 0, 0]);
        assert_eq!(parse_connect(&p.bytes(), MAX), Err(Refusal::ProtocolError("property value out of range")));
        p.props = Some(vec![0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2]);
        assert_eq!(parse_connect(&p.bytes(), MAX), Err(Refusal::ProtocolError("property given twice")));
        // Empty client IDs: refused in 3.1, and in 3.1.1 without a clean
        // session; MQTT 5 lets the broker assign one.
        let mut p = b(3);
        p.client_id = b"";
        assert_eq!(parse_connect(&p.bytes(), MAX), Err(Refusal::IdentifierRejected("empty in MQTT 3.1")));
        let mut p = b(4);
        p.client_id = b"";
        assert!(parse_connect(&p.bytes(), MAX).is_ok_and(|c| c.is_some()), "3.1.1 with a clean session");
        p.flags &= !0x02;
        assert_eq!(
            parse_connect(&p.bytes(), MAX),
            Err(Refusal::IdentifierRejected("empty, with a persistent session"))
        );
        let mut p = b(5);
        p.client_id = b"";
        p.flags &= !0x02;
        assert!(parse_connect(&p.bytes(), MAX).is_ok_and(|c| c.is_some()), "5.0 without a clean start");
        // Trailing bytes inside the remaining length.
        let mut bytes = b(4).bytes();
        bytes[1] += 1;
        bytes.push(0);
        assert_eq!(parse_connect(&bytes, MAX), Err(Refusal::Malformed("bytes after the payload")));
        // Fields that claim more than the remaining length.
        let mut bytes = b(4).bytes();
        bytes[1] -= 2;
        bytes.truncate(bytes.len() - 2);
        assert_eq!(parse_connect(&bytes, MAX), Err(Refusal::Malformed("fields run past the remaining length")));
    }

    proptest::proptest! {
        /// Any bytes: no panic; a CONNECT found is the whole of its own
        /// prefix, and every shorter prefix of it needs more.
        #[test]
        fn any_bytes(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            if let Ok(Some(c)) = parse_connect(&data, MAX) {
                proptest::prop_assert!(c.len <= data.len());
                proptest::prop_assert_eq!(parse_connect(&data[..c.len], MAX), Ok(Some(c.clone())));
                for cut in 0..c.len {
                    proptest::prop_assert_eq!(parse_connect(&data[..cut], MAX), Ok(None));
                }
            }
        }

        /// A valid CONNECT with any bytes after it (the client's next
        /// packets) parses the same, its length excluding them.
        #[test]
        fn pipelined(tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), level in 3u8..=5) {
            let mut bytes = b(level).bytes();
            let len = bytes.len();
            bytes.extend(&tail);
            let c = parse_connect(&bytes, MAX).unwrap().unwrap();
            proptest::prop_assert_eq!(c.len, len);
        }
    }

    #[test]
    fn refuses_bad_lengths() {
        assert_eq!(parse_connect(&[0x10, 0xff, 0xff, 0xff, 0xff], MAX), Err(Refusal::Malformed("remaining length over four bytes")));
        assert_eq!(parse_connect(&[0x10, 0x80, 0x00], MAX), Err(Refusal::Malformed("remaining length not in its shortest form")));
        // Refused from the length alone, before the bytes arrive.
        assert_eq!(parse_connect(&[0x10, 0xff, 0xff, 0x7f], MAX), Err(Refusal::TooLarge));
        let bytes = b(4).bytes();
        assert_eq!(parse_connect(&bytes, bytes.len() - 1), Err(Refusal::TooLarge));
    }

    #[test]
    fn refuses_unknown_levels_early_and_answers_in_kind() {
        let mut p = b(4);
        p.level = 6;
        let bytes = p.bytes();
        // Refused once the level byte is in, without the rest.
        assert_eq!(parse_connect(&bytes[..9], MAX), Err(Refusal::UnsupportedVersion(6)));
        let r = parse_connect(&bytes, MAX).unwrap_err();
        assert_eq!(r.connack(level(&bytes)), Some(&[0x20, 0x03, 0x00, 0x84, 0x00][..]));
        p.level = 2;
        let bytes = p.bytes();
        // MQIsdp is level 3 only.
        let mut q = b(5);
        q.name = b"MQIsdp";
        assert_eq!(parse_connect(&q.bytes(), MAX), Err(Refusal::UnsupportedVersion(5)));
        assert_eq!(parse_connect(&bytes, MAX).unwrap_err().connack(level(&bytes)), Some(&[0x20, 0x02, 0x00, 0x01][..]));
        assert_eq!(Refusal::Malformed("x").connack(Some(5)), Some(&[0x20, 0x03, 0x00, 0x81, 0x00][..]));
        assert_eq!(Refusal::Malformed("x").connack(Some(4)), None);
        assert_eq!(Refusal::ProtocolError("x").connack(Some(5)), Some(&[0x20, 0x03, 0x00, 0x82, 0x00][..]));
        assert_eq!(Refusal::ProtocolError("x").connack(Some(4)), None);
        assert_eq!(Refusal::IdentifierRejected("x").connack(Some(3)), Some(&[0x20, 0x02, 0x00, 0x02][..]));
        assert_eq!(Refusal::NotConnect.connack(None), None);
    }
}
