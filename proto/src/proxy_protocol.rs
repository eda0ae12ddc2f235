//! HAProxy PROXY protocol v1 (text) and v2 (binary): building and parsing
//! headers, with no I/O. Spec: haproxy `doc/proxy-protocol.txt`.
//!
//! Address families on output: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`)
//! is what a dual-stack listener reports for an IPv4 client, so it is emitted
//! as plain IPv4 and the broker sees the client's real IPv4 address. If the two
//! addresses are then still of different families, the IPv4 one is mapped to
//! IPv6, because a header carries a single family. See [`normalize`].


use std::fmt;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// Longest v1 line, CRLF included ("PROXY UNKNOWN" + two full IPv6 + ports).
pub const V1_MAX_LEN: usize = 107;
/// Every v1 header starts with this.
pub const V1_PREFIX: &[u8] = b"PROXY ";
pub const V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// Fixed part of a v2 header: signature, ver_cmd, fam, 2-byte length.
pub const V2_HEADER_LEN: usize = 16;
/// Largest possible v2 header (the length field is a u16). Callers wanting a
/// smaller cap check `Header::len` or the length field themselves.
pub const V2_MAX_LEN: usize = V2_HEADER_LEN + u16::MAX as usize;
/// TLV bytes that always fit in a v2 header, whatever the address family.
pub const V2_MAX_TLVS_LEN: usize = u16::MAX as usize - 36;

pub const PP2_TYPE_ALPN: u8 = 0x01;
pub const PP2_TYPE_AUTHORITY: u8 = 0x02;
pub const PP2_TYPE_CRC32C: u8 = 0x03;
pub const PP2_TYPE_NOOP: u8 = 0x04;
pub const PP2_TYPE_UNIQUE_ID: u8 = 0x05;
pub const PP2_TYPE_SSL: u8 = 0x20;
pub const PP2_TYPE_NETNS: u8 = 0x30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// Which inbound versions a parse takes (a listener's `accept-proxy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Versions {
    V1,
    V2,
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Proxy,
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: Version,
    pub command: Command,
    /// (source, destination) for PROXY over TCP4/TCP6; None for v2 LOCAL
    /// (whatever family it carries), v1 UNKNOWN and v2 UNSPEC: such headers
    /// never inject an address. (v2 PROXY over UDP or unix is refused.)
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// Raw v2 TLV bytes, already bounds-checked (every TLV's length fits
    /// inside the header). Empty for v1.
    pub tlvs: Vec<u8>,
    /// Total header length in bytes (how many bytes of the input the header
    /// occupies).
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Not enough bytes yet to decide; read more and retry. Only returned
    /// while the bytes so far can still start a valid header.
    Incomplete,
    /// Does not start with a PROXY header of an accepted version at all.
    Missing,
    /// A v1 line with no CRLF within its first 107 bytes, or (from
    /// `parse_within`) a v2 header declaring more than the reader takes.
    TooLong,
    /// Present but malformed; the string says what is wrong.
    Invalid(String),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Incomplete => f.write_str("incomplete PROXY protocol header"),
            ParseError::Missing => f.write_str("no PROXY protocol header"),
            ParseError::TooLong => f.write_str("PROXY protocol header too long"),
            ParseError::Invalid(why) => write!(f, "invalid PROXY protocol header: {why}"),
        }
    }
}

impl std::error::Error for ParseError {}

fn invalid(why: &str) -> ParseError {
    ParseError::Invalid(why.to_string())
}

/// Both addresses in one family, as they go on the wire.
enum Pair {
    V4(SocketAddrV4, SocketAddrV4),
    V6(SocketAddrV6, SocketAddrV6),
}

fn pair(src: SocketAddr, dst: SocketAddr) -> Pair {
    // IPv4-mapped IPv6 becomes IPv4 (see the module docs).
    let unmap = |a: SocketAddr| match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => a,
        },
        SocketAddr::V4(_) => a,
    };
    // Flow info and scope id are not carried by the protocol.
    let to_v6 = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0),
        SocketAddr::V6(v6) => SocketAddrV6::new(*v6.ip(), v6.port(), 0, 0),
    };
    match (unmap(src), unmap(dst)) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => Pair::V4(s, d),
        (s, d) => Pair::V6(to_v6(s), to_v6(d)),
    }
}

/// The addresses exactly as a header built from `src`/`dst` carries them (and
/// as `parse` gives them back): IPv4-mapped unmapped, mixed families mapped to
/// IPv6, IPv6 flow info and scope id dropped.
pub fn normalize(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    match pair(src, dst) {
        Pair::V4(s, d) => (s.into(), d.into()),
        Pair::V6(s, d) => (s.into(), d.into()),
    }
}

pub fn build_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (s, d) = normalize(src, dst);
    let proto = if s.is_ipv4() { "TCP4" } else { "TCP6" };
    // `Ipv6Addr`'s Display is the compressed RFC 5952 form, without brackets.
    format!(
        "PROXY {proto} {} {} {} {}\r\n",
        s.ip(),
        d.ip(),
        s.port(),
        d.port()
    )
    .into_bytes()
}

/// v2 PROXY command, STREAM over AF_INET or AF_INET6; `tlvs` are raw TLV bytes
/// appended verbatim. None if they do not fit in the 16-bit length field
/// (never when `tlvs.len() <= V2_MAX_TLVS_LEN`).
pub fn try_build_v2(src: SocketAddr, dst: SocketAddr, tlvs: &[u8]) -> Option<Vec<u8>> {
    let mut addr = Vec::with_capacity(36);
    let (fam, ports) = match pair(src, dst) {
        Pair::V4(s, d) => {
            addr.extend_from_slice(&s.ip().octets());
            addr.extend_from_slice(&d.ip().octets());
            (0x11, [s.port(), d.port()])
        }
        Pair::V6(s, d) => {
            addr.extend_from_slice(&s.ip().octets());
            addr.extend_from_slice(&d.ip().octets());
            (0x21, [s.port(), d.port()])
        }
    };
    for p in ports {
        addr.extend_from_slice(&p.to_be_bytes());
    }
    let len = u16::try_from(addr.len() + tlvs.len()).ok()?;
    let mut out = Vec::with_capacity(V2_HEADER_LEN + usize::from(len));
    out.extend_from_slice(&V2_SIGNATURE);
    out.extend_from_slice(&[0x21, fam]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&addr);
    out.extend_from_slice(tlvs);
    Some(out)
}

/// v2 PROXY command, STREAM over AF_INET or AF_INET6; `tlvs` are raw TLV bytes
/// appended verbatim.
///
/// # Panics
/// If `tlvs` is longer than `V2_MAX_TLVS_LEN` and does not fit beside the
/// address block; use [`try_build_v2`] or [`tlvs_for_reemit`] (which caps its
/// output) when the TLVs come from the network.
pub fn build_v2(src: SocketAddr, dst: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    try_build_v2(src, dst, tlvs).expect("PROXY v2 TLVs exceed the 16-bit header length")
}

/// A header with no TLVs.
pub fn build(version: Version, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    match version {
        Version::V1 => build_v1(src, dst),
        Version::V2 => build_v2(src, dst, &[]),
    }
}

/// A header for a connection with no client behind it (a health check):
/// v1 `UNKNOWN`, v2 `LOCAL`, which receivers answer with their own view
/// of the connection.
pub fn local_header(version: Version) -> Vec<u8> {
    match version {
        Version::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        Version::V2 => {
            let mut out = V2_SIGNATURE.to_vec();
            out.extend_from_slice(&[0x20, 0x00, 0, 0]);
            out
        }
    }
}

/// Parses a header at the start of `buf`; bytes after it are left alone.
///
/// The version is told by the first byte (`P` or `\r`), so with `Versions::V1`
/// a v2 signature is `Missing`, and with `Versions::V2` a v1 line is `Missing`:
/// for that listener there is no header it understands.
pub fn parse(buf: &[u8], accept: Versions) -> Result<Header, ParseError> {
    let starts_like = |prefix: &[u8]| buf.iter().zip(prefix).all(|(a, b)| a == b);
    let v1 = accept != Versions::V2 && starts_like(V1_PREFIX);
    let v2 = accept != Versions::V1 && starts_like(&V2_SIGNATURE);
    match (v1, v2) {
        (true, true) => Err(ParseError::Incomplete), // empty input
        (true, false) => parse_v1(buf),
        (false, true) => parse_v2(buf),
        (false, false) => Err(ParseError::Missing),
    }
}

/// `buf` is known to start like `V1_PREFIX`.
fn parse_v1(buf: &[u8]) -> Result<Header, ParseError> {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let body = |end: usize| window.get(V1_PREFIX.len()..end).unwrap_or_default();
    if let Some(end) = window.windows(2).position(|w| w == b"\r\n") {
        let addresses = v1_line(body(end), false)?;
        return Ok(Header {
            version: Version::V1,
            command: Command::Proxy,
            addresses,
            tlvs: Vec::new(),
            len: end + 2,
        });
    }
    if buf.len() >= V1_MAX_LEN {
        return Err(ParseError::TooLong);
    }
    // No CRLF yet: fail now if no continuation can make this a valid line.
    let so_far = body(window.len());
    match so_far.strip_suffix(b"\r") {
        // A final CR can only be the CRLF's, so the line must be whole.
        Some(line) => v1_line(line, false)?,
        None => v1_line(so_far, true)?,
    };
    Err(ParseError::Incomplete)
}

const V1_FIELDS: [&str; 4] = [
    "source address",
    "destination address",
    "source port",
    "destination port",
];

/// Checks the text between "PROXY " and CRLF. With `partial`, `line` is only
/// what has arrived so far and need only be the start of a valid line.
fn v1_line(line: &[u8], partial: bool) -> Result<Option<(SocketAddr, SocketAddr)>, ParseError> {
    let mut fields = line.split(|&b| b == b' ');
    let proto = fields.next().unwrap_or_default();
    let rest: Vec<&[u8]> = fields.collect();
    let bad_proto = || invalid("bad v1 protocol (want TCP4, TCP6 or UNKNOWN)");
    if partial && rest.is_empty() {
        let protos: [&[u8]; 3] = [b"TCP4", b"TCP6", b"UNKNOWN"];
        return match protos.iter().any(|p| p.starts_with(proto)) {
            true => Ok(None),
            false => Err(bad_proto()),
        };
    }
    let v6 = match proto {
        b"TCP4" => false,
        b"TCP6" => true,
        // The spec says to ignore whatever follows UNKNOWN up to the CRLF.
        b"UNKNOWN" => return Ok(None),
        _ => return Err(bad_proto()),
    };
    let bad = |field: &str| ParseError::Invalid(format!("bad v1 {field}"));
    if partial {
        if rest.len() > V1_FIELDS.len() {
            return Err(invalid("too many v1 fields"));
        }
        for (i, (field, name)) in rest.iter().zip(V1_FIELDS).enumerate() {
            let last = i + 1 == rest.len();
            let ok = match (i < 2, last) {
                (true, false) => v1_ip(field, v6).is_some(),
                (true, true) => v1_ip_start(field, v6),
                (false, false) => v1_port(field).is_some(),
                (false, true) => field.is_empty() || v1_port(field).is_some(),
            };
            if !ok {
                return Err(bad(name));
            }
        }
        return Ok(None);
    }
    let [src, dst, sport, dport] = rest.as_slice() else {
        return Err(invalid("wrong number of v1 fields"));
    };
    let src = v1_ip(src, v6).ok_or_else(|| bad(V1_FIELDS[0]))?;
    let dst = v1_ip(dst, v6).ok_or_else(|| bad(V1_FIELDS[1]))?;
    let sport = v1_port(sport).ok_or_else(|| bad(V1_FIELDS[2]))?;
    let dport = v1_port(dport).ok_or_else(|| bad(V1_FIELDS[3]))?;
    Ok(Some((
        SocketAddr::new(src, sport),
        SocketAddr::new(dst, dport),
    )))
}

/// std's parsers match the spec: dotted quad without leading zeros for IPv4
/// (the spec forbids them to avoid octal confusion), RFC 4291 text for IPv6.
fn v1_ip(s: &[u8], v6: bool) -> Option<IpAddr> {
    let s = std::str::from_utf8(s).ok()?;
    match v6 {
        false => s.parse().ok().map(IpAddr::V4),
        true => s.parse().ok().map(IpAddr::V6),
    }
}

/// Could `s` be the start of a valid address? Exact for IPv4; for IPv6 only
/// the character set and the longest text form (45) are checked, so a bad
/// IPv6 prefix is caught a little later, once its CRLF or space arrives.
fn v1_ip_start(s: &[u8], v6: bool) -> bool {
    if v6 {
        return s.len() <= 45
            && s.iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
    }
    let parts: Vec<&[u8]> = s.split(|&b| b == b'.').collect();
    parts.len() <= 4
        && parts
            .iter()
            .enumerate()
            .all(|(i, p)| dec(p, 255).is_some() || (i + 1 == parts.len() && p.is_empty()))
}

fn v1_port(s: &[u8]) -> Option<u16> {
    dec(s, u16::MAX.into()).and_then(|n| u16::try_from(n).ok())
}

/// Decimal digits only, no sign, no leading zero (the spec forbids them),
/// at most `max`.
fn dec(s: &[u8], max: u32) -> Option<u32> {
    if s.is_empty() || s.len() > 5 || (s.len() > 1 && s.first() == Some(&b'0')) {
        return None;
    }
    s.iter()
        .try_fold(0u32, |n, &b| {
            b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0'))
        })
        .filter(|&n| n <= max)
}

/// `buf` is known to start like `V2_SIGNATURE`.
fn parse_v2(buf: &[u8]) -> Result<Header, ParseError> {
    // Each fixed byte is checked as soon as it arrives, so junk fails early.
    let command = match buf.get(12) {
        None => return Err(ParseError::Incomplete),
        Some(b) if b >> 4 != 2 => return Err(invalid("unsupported v2 version")),
        Some(b) => match b & 0x0F {
            0 => Command::Local,
            1 => Command::Proxy,
            _ => return Err(invalid("unsupported v2 command")),
        },
    };
    let fam = *buf.get(13).ok_or(ParseError::Incomplete)?;
    // LOCAL: the spec has the receiver ignore the family and discard the
    // whole block (HAProxy's health checks send LOCAL with TCP over IPv4
    // and no addresses). Its TLVs are kept only where the family says
    // where they start and they are well formed.
    if command == Command::Local {
        let len = v2_declared_len(buf).ok_or(ParseError::Incomplete)?;
        let block = buf
            .get(V2_HEADER_LEN..V2_HEADER_LEN + len)
            .ok_or(ParseError::Incomplete)?;
        let tlvs = v2_addr_len(fam)
            .and_then(|n| block.get(n..))
            .filter(|t| tlvs_well_formed(t))
            .unwrap_or_default();
        return Ok(Header {
            version: Version::V2,
            command,
            addresses: None,
            tlvs: tlvs.to_vec(),
            len: V2_HEADER_LEN + len,
        });
    }
    let addr_len = match fam {
        // A client behind a UDP or unix socket cannot be the peer of a TCP
        // connection; splicer's listeners are all TCP.
        0x12 | 0x22 | 0x31 | 0x32 => {
            return Err(invalid("v2 PROXY for a UDP or unix socket on a TCP connection"))
        }
        _ => v2_addr_len(fam).ok_or_else(|| invalid("unsupported v2 address family"))?,
    };
    let len = v2_declared_len(buf).ok_or(ParseError::Incomplete)?;
    if len < addr_len {
        return Err(invalid("v2 address block longer than the header"));
    }
    let block = buf
        .get(V2_HEADER_LEN..V2_HEADER_LEN + len)
        .ok_or(ParseError::Incomplete)?;
    let (addr, tlv_area) = block
        .split_at_checked(addr_len)
        .ok_or_else(|| invalid("v2 address block longer than the header"))?;
    if !tlvs_well_formed(tlv_area) {
        return Err(invalid("TLV length exceeds header"));
    }
    let addresses = match fam {
        0x11 => Some(v2_pair::<4>(addr)?),
        0x21 => Some(v2_pair::<16>(addr)?),
        _ => None, // UNSPEC
    };
    Ok(Header {
        version: Version::V2,
        command,
        addresses,
        tlvs: tlv_area.to_vec(),
        len: V2_HEADER_LEN + len,
    })
}

/// The address block's length for a v2 family byte, if the family is known.
fn v2_addr_len(fam: u8) -> Option<usize> {
    match fam {
        0x00 => Some(0),          // UNSPEC
        0x11 | 0x12 => Some(12),  // TCP/UDP over IPv4
        0x21 | 0x22 => Some(36),  // TCP/UDP over IPv6
        0x31 | 0x32 => Some(216), // unix stream/dgram
        _ => None,
    }
}

/// The length field of a v2 header (the bytes after the 16-byte prefix),
/// once the prefix is in.
fn v2_declared_len(buf: &[u8]) -> Option<usize> {
    match buf.get(14..V2_HEADER_LEN) {
        Some(&[hi, lo]) => Some(usize::from(u16::from_be_bytes([hi, lo]))),
        _ => None,
    }
}

fn tlvs_well_formed(mut rest: &[u8]) -> bool {
    while !rest.is_empty() {
        match split_tlv(rest) {
            Some((_, _, r)) => rest = r,
            None => return false,
        }
    }
    true
}

/// `parse`, for a reader that takes at most `max` bytes: a v2 header that
/// declares more is `TooLong` as soon as its 16-byte prefix is in, rather
/// than after `max` bytes have trickled in.
pub fn parse_within(buf: &[u8], accept: Versions, max: usize) -> Result<Header, ParseError> {
    match parse(buf, accept) {
        Err(ParseError::Incomplete)
            if buf.starts_with(&V2_SIGNATURE)
                && v2_declared_len(buf).is_some_and(|len| V2_HEADER_LEN + len > max) =>
        {
            Err(ParseError::TooLong)
        }
        other => other,
    }
}

/// src addr, dst addr (N bytes each), src port, dst port.
fn v2_pair<const N: usize>(addr: &[u8]) -> Result<(SocketAddr, SocketAddr), ParseError>
where
    IpAddr: From<[u8; N]>,
{
    let short = || invalid("short v2 address block");
    let (s, rest) = addr.split_first_chunk::<N>().ok_or_else(short)?;
    let (d, rest) = rest.split_first_chunk::<N>().ok_or_else(short)?;
    let (sp, rest) = rest.split_first_chunk::<2>().ok_or_else(short)?;
    let (dp, _) = rest.split_first_chunk::<2>().ok_or_else(short)?;
    Ok((
        SocketAddr::new(IpAddr::from(*s), u16::from_be_bytes(*sp)),
        SocketAddr::new(IpAddr::from(*d), u16::from_be_bytes(*dp)),
    ))
}

/// First TLV of `raw` as (type, value, rest), or None if it is truncated.
fn split_tlv(raw: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&[typ, hi, lo], tail) = raw.split_first_chunk::<3>()?;
    let (value, rest) = tail.split_at_checked(usize::from(u16::from_be_bytes([hi, lo])))?;
    Some((typ, value, rest))
}

/// Iterate the TLVs of a validated TLV byte string as (type, value). Stops at
/// the first truncated TLV (never the case for `Header::tlvs`).
pub fn tlvs(raw: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = raw;
    std::iter::from_fn(move || {
        let (typ, value, tail) = split_tlv(rest)?;
        rest = tail;
        Some((typ, value))
    })
}

/// TLVs to keep when re-emitting a v2 header with new addresses: everything
/// except PP2_TYPE_CRC32C (it would no longer match) and PP2_TYPE_NOOP
/// (padding). TLVs that would take the total past `V2_MAX_TLVS_LEN` are
/// dropped too, so `build_v2` with the result never fails.
pub fn tlvs_for_reemit(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (typ, value) in tlvs(raw) {
        if typ == PP2_TYPE_CRC32C || typ == PP2_TYPE_NOOP {
            continue;
        }
        if out.len() + 3 + value.len() > V2_MAX_TLVS_LEN {
            continue;
        }
        out.push(typ);
        // Fits: value came from a u16 length field.
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
        out.extend_from_slice(value);
    }
    out
}

/// PP2_TYPE_SSL's `client` bits.
pub const PP2_CLIENT_SSL: u8 = 0x01;
pub const PP2_CLIENT_CERT_CONN: u8 = 0x02;
pub const PP2_CLIENT_CERT_SESS: u8 = 0x04;
pub const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
pub const PP2_SUBTYPE_SSL_CN: u8 = 0x22;
pub const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
pub const PP2_SUBTYPE_SSL_SIG_ALG: u8 = 0x24;
pub const PP2_SUBTYPE_SSL_KEY_ALG: u8 = 0x25;

/// A TLS connection the sender terminated, as PP2_TYPE_SSL describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ssl<'a> {
    /// The client showed a certificate in this TLS session, and it was
    /// verified (a certificate that fails verification ends the handshake).
    pub cert_in_session: bool,
    /// It showed it on this connection: a full handshake, not a resumed one.
    pub cert_on_connection: bool,
    /// "TLSv1.3", "TLSv1.2".
    pub version: &'a str,
    /// The client certificate's subject CN.
    pub cn: Option<&'a str>,
    pub cipher: &'a str,
    /// How the certificate the sender presented to the client (the spec's
    /// "frontend" certificate) is signed, and its key.
    pub sig_alg: Option<&'a str>,
    pub key_alg: Option<&'a str>,
}

/// Appends one TLV. Callers bound their values well below the 64 KiB a
/// TLV can hold (a longer one would be cut, never spill into the next).
pub fn put_tlv(out: &mut Vec<u8>, typ: u8, value: &[u8]) {
    debug_assert!(u16::try_from(value.len()).is_ok());
    let value = &value[..value.len().min(usize::from(u16::MAX))];
    out.push(typ);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

/// PP2_TYPE_ALPN when a protocol was agreed, PP2_TYPE_SSL with its
/// sub-TLVs (the fields HAProxy's `send-proxy-v2-ssl-cn` sends), then
/// PP2_TYPE_AUTHORITY when the client named a server. `verify` is 0 only
/// when a client certificate was shown and verified, as the spec says
/// ("non-zero otherwise"; HAProxy sends 0 without one), so a broker that
/// reads it alone cannot take a client without a certificate for a
/// verified one.
pub fn ssl_tlvs(ssl: &Ssl<'_>, authority: Option<&str>, alpn: Option<&[u8]>) -> Vec<u8> {
    let mut subs = Vec::new();
    put_tlv(&mut subs, PP2_SUBTYPE_SSL_VERSION, ssl.version.as_bytes());
    if let Some(cn) = ssl.cn {
        put_tlv(&mut subs, PP2_SUBTYPE_SSL_CN, cn.as_bytes());
    }
    put_tlv(&mut subs, PP2_SUBTYPE_SSL_CIPHER, ssl.cipher.as_bytes());
    if let Some(alg) = ssl.sig_alg {
        put_tlv(&mut subs, PP2_SUBTYPE_SSL_SIG_ALG, alg.as_bytes());
    }
    if let Some(alg) = ssl.key_alg {
        put_tlv(&mut subs, PP2_SUBTYPE_SSL_KEY_ALG, alg.as_bytes());
    }
    let mut client = PP2_CLIENT_SSL;
    if ssl.cert_in_session {
        client |= PP2_CLIENT_CERT_SESS;
    }
    if ssl.cert_on_connection {
        client |= PP2_CLIENT_CERT_CONN;
    }
    let verify = u32::from(!ssl.cert_in_session);
    let mut value = vec![client];
    value.extend_from_slice(&verify.to_be_bytes());
    value.extend_from_slice(&subs);
    let mut out = Vec::new();
    if let Some(protocol) = alpn {
        put_tlv(&mut out, PP2_TYPE_ALPN, protocol);
    }
    put_tlv(&mut out, PP2_TYPE_SSL, &value);
    if let Some(name) = authority {
        put_tlv(&mut out, PP2_TYPE_AUTHORITY, name.as_bytes());
    }
    out
}

/// Whether a TLV describes the client's TLS or where it connected
/// (PP2_TYPE_SSL, PP2_TYPE_AUTHORITY, PP2_TYPE_ALPN): a hop that terminates
/// TLS itself sends its own, never an earlier hop's.
pub fn describes_tls(typ: u8) -> bool {
    matches!(typ, PP2_TYPE_SSL | PP2_TYPE_AUTHORITY | PP2_TYPE_ALPN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn local_headers_carry_no_address() {
        let v1 = local_header(Version::V1);
        assert_eq!(v1, b"PROXY UNKNOWN\r\n");
        let h = parse(&v1, Versions::Auto).unwrap();
        assert_eq!((h.addresses, h.len), (None, v1.len()));
        let v2 = local_header(Version::V2);
        let h = parse(&v2, Versions::Auto).unwrap();
        assert_eq!((h.command, h.addresses, h.len), (Command::Local, None, 16));
    }

    fn tlv(typ: u8, value: &[u8]) -> Vec<u8> {
        let mut v = vec![typ];
        v.extend_from_slice(&(value.len() as u16).to_be_bytes());
        v.extend_from_slice(value);
        v
    }

    fn v2(ver_cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.extend_from_slice(&[ver_cmd, fam]);
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn is_invalid(r: Result<Header, ParseError>) -> bool {
        matches!(r, Err(ParseError::Invalid(_)))
    }

    const ACCEPTS: [Versions; 3] = [Versions::V1, Versions::V2, Versions::Auto];

    // 192.168.0.1:56324 -> 192.168.0.11:443, the spec's example.
    const V2_TCP4: [u8; 28] = [
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, // signature
        0x21, 0x11, 0x00, 0x0C, // v2 PROXY, TCP over IPv4, 12 bytes
        0xC0, 0xA8, 0x00, 0x01, // 192.168.0.1
        0xC0, 0xA8, 0x00, 0x0B, // 192.168.0.11
        0xDC, 0x04, 0x01, 0xBB, // 56324, 443
    ];

    // [2001:db8::1]:56324 -> [2001:db8::11]:443
    const V2_TCP6: [u8; 52] = [
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, // signature
        0x21, 0x21, 0x00, 0x24, // v2 PROXY, TCP over IPv6, 36 bytes
        0x20, 0x01, 0x0D, 0xB8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // 2001:db8::1
        0x20, 0x01, 0x0D, 0xB8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11, // 2001:db8::11
        0xDC, 0x04, 0x01, 0xBB, // 56324, 443
    ];

    // V2_TCP4 plus AUTHORITY "example.com" and UNIQUE_ID 01 02 03 04.
    const V2_TCP4_TLVS: [u8; 49] = [
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, // signature
        0x21, 0x11, 0x00, 0x21, // v2 PROXY, TCP over IPv4, 12 + 14 + 7 = 33 bytes
        0xC0, 0xA8, 0x00, 0x01, 0xC0, 0xA8, 0x00, 0x0B, 0xDC, 0x04, 0x01, 0xBB, // addresses
        0x02, 0x00, 0x0B, // AUTHORITY, 11 bytes
        b'e', b'x', b'a', b'm', b'p', b'l', b'e', b'.', b'c', b'o', b'm', // "example.com"
        0x05, 0x00, 0x04, 0x01, 0x02, 0x03, 0x04, // UNIQUE_ID
    ];

    const V1_TCP4: &[u8] = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
    const V1_TCP6: &[u8] = b"PROXY TCP6 2001:db8::1 2001:db8::11 56324 443\r\n";
    const V1_TCP6_MAX: &[u8] = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    const V1_UNKNOWN_MAX: &[u8] = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";

    const MQTT_CONNECT: [u8; 14] = [
        0x10, 0x0C, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C, 0x00, 0x00,
    ];

    // ---- exact layouts ----

    #[test]
    fn v1_tcp4_layout() {
        let (s, d) = (sa("192.168.0.1:56324"), sa("192.168.0.11:443"));
        assert_eq!(build_v1(s, d), V1_TCP4);
        assert_eq!(build(Version::V1, s, d), V1_TCP4);
        let h = parse(V1_TCP4, Versions::V1).unwrap();
        assert_eq!(
            h,
            Header {
                version: Version::V1,
                command: Command::Proxy,
                addresses: Some((s, d)),
                tlvs: vec![],
                len: V1_TCP4.len(),
            }
        );
    }

    #[test]
    fn v1_tcp6_layout() {
        let (s, d) = (sa("[2001:db8::1]:56324"), sa("[2001:db8::11]:443"));
        assert_eq!(build_v1(s, d), V1_TCP6);
        let h = parse(V1_TCP6, Versions::Auto).unwrap();
        assert_eq!(h.addresses, Some((s, d)));
        assert_eq!(h.len, V1_TCP6.len());
    }

    #[test]
    fn v1_longest_lines() {
        assert_eq!(V1_TCP6_MAX.len(), 104);
        assert_eq!(V1_UNKNOWN_MAX.len(), V1_MAX_LEN);
        let h = parse(V1_TCP6_MAX, Versions::V1).unwrap();
        let ff = SocketAddr::new(IpAddr::V6(Ipv6Addr::from([0xFF; 16])), 65535);
        assert_eq!(h.addresses, Some((ff, ff)));
        let h = parse(V1_UNKNOWN_MAX, Versions::V1).unwrap();
        assert_eq!((h.addresses, h.len), (None, 107));
        assert_eq!(build_v1(ff, ff), V1_TCP6_MAX);
    }

    #[test]
    fn v2_tcp4_layout() {
        let (s, d) = (sa("192.168.0.1:56324"), sa("192.168.0.11:443"));
        assert_eq!(build_v2(s, d, &[]), V2_TCP4);
        assert_eq!(build(Version::V2, s, d), V2_TCP4);
        let h = parse(&V2_TCP4, Versions::V2).unwrap();
        assert_eq!(
            h,
            Header {
                version: Version::V2,
                command: Command::Proxy,
                addresses: Some((s, d)),
                tlvs: vec![],
                len: 28,
            }
        );
    }

    #[test]
    fn v2_tcp6_layout() {
        let (s, d) = (sa("[2001:db8::1]:56324"), sa("[2001:db8::11]:443"));
        assert_eq!(build_v2(s, d, &[]), V2_TCP6);
        let h = parse(&V2_TCP6, Versions::Auto).unwrap();
        assert_eq!((h.addresses, h.len), (Some((s, d)), 52));
    }

    #[test]
    fn ssl_tlvs_are_laid_out_as_the_spec_says() {
        let ssl = Ssl {
            cert_in_session: true,
            cert_on_connection: true,
            version: "TLSv1.3",
            cn: Some("dev"),
            cipher: "C",
            sig_alg: Some("S"),
            key_alg: Some("K"),
        };
        let mut want = vec![PP2_TYPE_ALPN, 0, 4];
        want.extend(b"mqtt");
        want.extend([PP2_TYPE_SSL, 0, 5 + 10 + 6 + 4 + 4 + 4, 0x07, 0, 0, 0, 0]);
        want.extend([0x21, 0, 7]);
        want.extend(b"TLSv1.3");
        want.extend([0x22, 0, 3]);
        want.extend(b"dev");
        want.extend([0x23, 0, 1, b'C', 0x24, 0, 1, b'S', 0x25, 0, 1, b'K']);
        want.extend([PP2_TYPE_AUTHORITY, 0, 3]);
        want.extend(b"a.b");
        assert_eq!(ssl_tlvs(&ssl, Some("a.b"), Some(b"mqtt")), want);
        // No certificate: SSL alone, verify non-zero, nothing about one.
        let bare = Ssl { version: "TLSv1.2", cipher: "C", ..Ssl::default() };
        let mut want = vec![PP2_TYPE_SSL, 0, 5 + 10 + 4, 0x01, 0, 0, 0, 1];
        want.extend([0x21, 0, 7]);
        want.extend(b"TLSv1.2");
        want.extend([0x23, 0, 1, b'C']);
        assert_eq!(ssl_tlvs(&bare, None, None), want);
        // Resumed: the certificate was shown in the session, not now.
        let resumed = Ssl { cert_on_connection: false, ..ssl };
        assert_eq!(ssl_tlvs(&resumed, None, None)[3], PP2_CLIENT_SSL | PP2_CLIENT_CERT_SESS);
    }

    #[test]
    fn v2_with_tlvs() {
        let (s, d) = (sa("192.168.0.1:56324"), sa("192.168.0.11:443"));
        let mut raw = tlv(PP2_TYPE_AUTHORITY, b"example.com");
        raw.extend(tlv(PP2_TYPE_UNIQUE_ID, &[1, 2, 3, 4]));
        assert_eq!(build_v2(s, d, &raw), V2_TCP4_TLVS);
        let h = parse(&V2_TCP4_TLVS, Versions::Auto).unwrap();
        assert_eq!(h.addresses, Some((s, d)));
        assert_eq!(h.len, V2_TCP4_TLVS.len());
        assert_eq!(h.tlvs, raw);
        let got: Vec<(u8, &[u8])> = tlvs(&h.tlvs).collect();
        assert_eq!(
            got,
            vec![
                (PP2_TYPE_AUTHORITY, &b"example.com"[..]),
                (PP2_TYPE_UNIQUE_ID, &[1u8, 2, 3, 4][..])
            ]
        );
    }

    #[test]
    fn v2_empty_tlv_value() {
        let mut body = V2_TCP4[16..].to_vec();
        body.extend(tlv(0xE0, b""));
        let h = parse(&v2(0x21, 0x11, &body), Versions::V2).unwrap();
        assert_eq!(tlvs(&h.tlvs).collect::<Vec<_>>(), vec![(0xE0, &[][..])]);
    }

    #[test]
    fn reemit_drops_crc_and_noop() {
        let mut raw = tlv(PP2_TYPE_CRC32C, &[1, 2, 3, 4]);
        raw.extend(tlv(PP2_TYPE_AUTHORITY, b"broker"));
        raw.extend(tlv(PP2_TYPE_NOOP, &[0; 5]));
        raw.extend(tlv(PP2_TYPE_SSL, &[1, 0, 0, 0, 0]));
        let mut want = tlv(PP2_TYPE_AUTHORITY, b"broker");
        want.extend(tlv(PP2_TYPE_SSL, &[1, 0, 0, 0, 0]));
        assert_eq!(tlvs_for_reemit(&raw), want);
        assert_eq!(tlvs_for_reemit(&[]), Vec::<u8>::new());
    }

    #[test]
    fn reemit_caps_size() {
        // Two near-maximal TLVs from an IPv4 header cannot both fit next to IPv6.
        let big = vec![7u8; 40_000];
        let mut raw = tlv(0xE1, &big);
        raw.extend(tlv(0xE2, &big[..25_500])); // 65506 bytes: fits IPv4 only
        raw.extend(tlv(0xE3, b"small"));
        assert!(try_build_v2(sa("1.2.3.4:1"), sa("5.6.7.8:2"), &raw).is_some());
        let out = tlvs_for_reemit(&raw);
        assert!(out.len() <= V2_MAX_TLVS_LEN);
        let types: Vec<u8> = tlvs(&out).map(|(t, _)| t).collect();
        assert_eq!(types, vec![0xE1, 0xE3]);
        let hdr = build_v2(sa("[::1]:1"), sa("[::2]:2"), &out);
        assert_eq!(parse(&hdr, Versions::V2).unwrap().tlvs, out);
    }

    #[test]
    fn build_v2_rejects_oversized_tlvs() {
        let (s4, d4) = (sa("1.2.3.4:1"), sa("5.6.7.8:2"));
        let (s6, d6) = (sa("[::1]:1"), sa("[::2]:2"));
        let at_cap = tlv(0xE0, &vec![0; V2_MAX_TLVS_LEN - 3]);
        assert!(try_build_v2(s6, d6, &at_cap).is_some());
        let over = tlv(0xE0, &vec![0; V2_MAX_TLVS_LEN - 2]);
        assert!(try_build_v2(s6, d6, &over).is_none());
        assert!(try_build_v2(s4, d4, &over).is_some()); // IPv4 block is smaller
        let hdr = try_build_v2(s4, d4, &tlv(0xE0, &vec![0; 65535 - 15])).unwrap();
        assert_eq!(hdr.len(), V2_MAX_LEN);
        assert_eq!(parse(&hdr, Versions::V2).unwrap().len, V2_MAX_LEN);
    }

    #[test]
    fn tlvs_iterator_stops_on_truncation() {
        let mut raw = tlv(1, b"ok");
        raw.extend_from_slice(&[2, 0, 9, b'x']);
        assert_eq!(tlvs(&raw).collect::<Vec<_>>(), vec![(1, &b"ok"[..])]);
        assert_eq!(tlvs(&[5, 0]).count(), 0);
    }

    // ---- IPv4-mapped and mixed families ----

    #[test]
    fn ipv4_mapped_on_both_sides_is_tcp4() {
        let (s, d) = (
            sa("[::ffff:192.168.0.1]:56324"),
            sa("[::ffff:192.168.0.11]:443"),
        );
        assert_eq!(build_v1(s, d), V1_TCP4);
        assert_eq!(build_v2(s, d, &[]), V2_TCP4);
    }

    #[test]
    fn ipv4_mapped_with_plain_ipv4_is_tcp4() {
        let (s, d) = (sa("[::ffff:192.168.0.1]:56324"), sa("192.168.0.11:443"));
        assert_eq!(build_v1(s, d), V1_TCP4);
        assert_eq!(build_v2(s, d, &[]), V2_TCP4);
    }

    #[test]
    fn mixed_families_map_ipv4_into_ipv6() {
        let (s, d) = (sa("10.0.0.1:1883"), sa("[2001:db8::11]:443"));
        assert_eq!(
            build_v1(s, d),
            b"PROXY TCP6 ::ffff:10.0.0.1 2001:db8::11 1883 443\r\n"
        );
        let mapped = sa("[::ffff:10.0.0.1]:1883");
        assert_eq!(normalize(s, d), (mapped, d));
        let b = build_v2(s, d, &[]);
        assert_eq!(&b[12..16], &[0x21, 0x21, 0x00, 0x24]);
        assert_eq!(
            &b[16..32],
            &Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped().octets()
        );
        assert_eq!(parse(&b, Versions::V2).unwrap().addresses, Some((mapped, d)));
        // A mapped address next to a real IPv6 one stays mapped.
        assert_eq!(build_v1(mapped, d), build_v1(s, d));
    }

    #[test]
    fn ipv6_scope_and_flowinfo_are_dropped() {
        let s = SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 5, 7, 3));
        let d = sa("[fe80::2]:6");
        let h = parse(&build_v2(s, d, &[]), Versions::V2).unwrap();
        assert_eq!(h.addresses, Some((sa("[fe80::1]:5"), d)));
        assert_eq!(h.addresses, Some(normalize(s, d)));
    }

    // ---- trailing data ----

    #[test]
    fn header_followed_by_mqtt_connect() {
        for hdr in [
            V1_TCP4,
            V1_TCP6,
            b"PROXY UNKNOWN\r\n",
            &V2_TCP4,
            &V2_TCP6,
            &V2_TCP4_TLVS,
        ] {
            let mut buf = hdr.to_vec();
            buf.extend_from_slice(&MQTT_CONNECT);
            let h = parse(&buf, Versions::Auto).unwrap();
            assert_eq!(h.len, hdr.len());
            assert_eq!(&buf[h.len..], MQTT_CONNECT);
        }
    }

    #[test]
    fn v1_header_followed_by_another_crlf_line() {
        let mut buf = V1_TCP4.to_vec();
        buf.extend_from_slice(b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\n");
        assert_eq!(parse(&buf, Versions::V1).unwrap().len, V1_TCP4.len());
    }

    // ---- Incomplete ----

    #[test]
    fn every_truncation_is_incomplete() {
        let local = v2(0x20, 0x00, &tlv(PP2_TYPE_UNIQUE_ID, b"id"));
        let cases: [(&[u8], Versions); 7] = [
            (V1_TCP4, Versions::V1),
            (V1_TCP6_MAX, Versions::V1),
            (V1_UNKNOWN_MAX, Versions::V1),
            (&V2_TCP4, Versions::V2),
            (&V2_TCP6, Versions::V2),
            (&V2_TCP4_TLVS, Versions::V2),
            (&local, Versions::V2),
        ];
        for (full, accept) in cases {
            for n in 0..full.len() {
                for a in [accept, Versions::Auto] {
                    assert_eq!(
                        parse(&full[..n], a),
                        Err(ParseError::Incomplete),
                        "{n} {full:?}"
                    );
                }
            }
            assert!(parse(full, Versions::Auto).is_ok());
        }
    }

    #[test]
    fn partial_lines_still_valid_are_incomplete() {
        for p in [
            &b"PRO"[..],
            b"PROXY",
            b"PROXY TCP4 1.2.",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r",
            b"PROXY TCP6 ::ffff:1.2",
            b"PROXY UNKNOWN",
            b"PROXY UNKNOWN\r",
            b"PROXY UNKNOWN whatever \r x",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65535 ",
        ] {
            assert_eq!(parse(p, Versions::Auto), Err(ParseError::Incomplete), "{p:?}");
        }
    }

    #[test]
    fn empty_input_is_incomplete() {
        for a in ACCEPTS {
            assert_eq!(parse(b"", a), Err(ParseError::Incomplete));
        }
    }

    // ---- Missing ----

    #[test]
    fn garbage_is_missing() {
        for g in [
            &b"GET / HTTP/1.1\r\n"[..],
            &MQTT_CONNECT,
            b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY\r\n",
            b"PROXYTCP4",
            b"\r\n\r\n\x01",
            b"\x16\x03\x01", // TLS ClientHello
        ] {
            for a in ACCEPTS {
                assert_eq!(parse(g, a), Err(ParseError::Missing), "{g:?}");
            }
        }
    }

    #[test]
    fn accept_mode_restricts_version() {
        assert_eq!(parse(&V2_TCP4, Versions::V1), Err(ParseError::Missing));
        assert_eq!(parse(&V2_TCP4[..3], Versions::V1), Err(ParseError::Missing));
        assert_eq!(parse(V1_TCP4, Versions::V2), Err(ParseError::Missing));
        assert_eq!(parse(b"PR", Versions::V2), Err(ParseError::Missing));
        assert!(parse(&V2_TCP4, Versions::V2).is_ok());
        assert!(parse(V1_TCP4, Versions::V1).is_ok());
    }

    // ---- TooLong ----

    #[test]
    fn v1_too_long() {
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(198, b'a');
        line.extend_from_slice(b"\r\n");
        assert_eq!(line.len(), 200);
        assert_eq!(parse(&line, Versions::V1), Err(ParseError::TooLong));

        // 108 bytes: one over, CRLF at the very end.
        let mut long = V1_UNKNOWN_MAX[..105].to_vec();
        long.extend_from_slice(b"f\r\n");
        assert_eq!(parse(&long, Versions::Auto), Err(ParseError::TooLong));
        // 107 bytes without CRLF is already too long; 106 is not yet.
        assert_eq!(parse(&long[..107], Versions::Auto), Err(ParseError::TooLong));
        assert_eq!(
            parse(&long[..106], Versions::Auto),
            Err(ParseError::Incomplete)
        );
    }

    // ---- v1 Invalid ----

    #[test]
    fn v1_invalid_lines() {
        for l in [
            &b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n"[..],
            b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 ::1 ::2 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP6 ::1 1:2:3:4:5:6:7:8:9 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1a 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8  1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
            b"PROXY TCP4 [::1] 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY \r\n",
            b"PROXY TCP4\r\n",
            b"PROXY UNKNOWNX\r\n",
        ] {
            assert!(
                is_invalid(parse(l, Versions::Auto)),
                "{:?}",
                String::from_utf8_lossy(l)
            );
        }
    }

    #[test]
    fn v1_invalid_detected_before_crlf() {
        for p in [
            &b"PROXY TCP9"[..],
            b"PROXY TCP4 1.2.3.4x",
            b"PROXY TCP4 1.2.3.4.",
            b"PROXY TCP4 1.2.3.04",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 70000",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ",
            b"PROXY TCP4 1.2.3.4\r",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY TCP6 ::g",
        ] {
            assert!(
                is_invalid(parse(p, Versions::V1)),
                "{:?}",
                String::from_utf8_lossy(p)
            );
        }
    }

    #[test]
    fn v1_port_edges() {
        let h = parse(
            b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
            Versions::V1,
        )
        .unwrap();
        assert_eq!(
            h.addresses,
            Some((sa("0.0.0.0:0"), sa("255.255.255.255:65535")))
        );
        // Upper-case hex and an embedded IPv4 tail are both valid IPv6 text.
        let h = parse(b"PROXY TCP6 2001:DB8::1 ::ffff:1.2.3.4 1 2\r\n", Versions::V1).unwrap();
        assert_eq!(
            h.addresses,
            Some((sa("[2001:db8::1]:1"), sa("[::ffff:1.2.3.4]:2")))
        );
    }

    #[test]
    fn v1_unknown_has_no_addresses() {
        for l in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UNKNOWN any \x00 junk\r\n",
        ] {
            let h = parse(l, Versions::V1).unwrap();
            assert_eq!(
                (h.command, h.addresses, h.len),
                (Command::Proxy, None, l.len())
            );
        }
    }

    // ---- v2 Invalid and the non-address cases ----

    #[test]
    fn v2_bad_version_command_family() {
        let body = &V2_TCP4[16..];
        for (vc, fam) in [
            (0x11, 0x11),
            (0x31, 0x11),
            (0x01, 0x11),
            (0x22, 0x11),
            (0x2F, 0x11),
        ] {
            let h = v2(vc, fam, body);
            assert!(is_invalid(parse(&h, Versions::V2)), "{vc:#x}");
            // Decided as soon as the 13th byte is in.
            assert!(is_invalid(parse(&h[..13], Versions::Auto)), "{vc:#x}");
        }
        for fam in [0x01, 0x10, 0x13, 0x23, 0x33, 0x41, 0xFF] {
            let h = v2(0x21, fam, body);
            assert!(is_invalid(parse(&h, Versions::V2)), "{fam:#x}");
            assert!(is_invalid(parse(&h[..14], Versions::V2)), "{fam:#x}");
        }
    }

    #[test]
    fn v2_length_shorter_than_address_block() {
        for (fam, n) in [(0x11, 11), (0x12, 0), (0x21, 35), (0x22, 12), (0x31, 215)] {
            let h = v2(0x21, fam, &vec![0; n]);
            assert!(is_invalid(parse(&h, Versions::V2)), "{fam:#x}");
            // Known from the length field alone.
            assert!(is_invalid(parse(&h[..16], Versions::V2)), "{fam:#x}");
        }
        // LOCAL is not: its block is discarded whatever it holds.
        assert!(parse(&v2(0x20, 0x11, &[0; 4]), Versions::V2).is_ok());
    }

    #[test]
    fn v2_tlv_overrun_is_invalid() {
        let addrs = &V2_TCP4[16..];
        for bad_tlvs in [
            &[0x02, 0x00, 0x05, b'a', b'b'][..], // length runs past the end
            &[0x02, 0x00],                       // truncated TLV header
            &[0x02],
            &[0x02, 0x00, 0x01, b'a', 0x05], // second TLV truncated
            &[0x02, 0xFF, 0xFF, 0x00],
        ] {
            let mut body = addrs.to_vec();
            body.extend_from_slice(bad_tlvs);
            assert!(
                is_invalid(parse(&v2(0x21, 0x11, &body), Versions::V2)),
                "{bad_tlvs:?}"
            );
            // LOCAL's block is discarded, broken TLVs and all.
            let local = parse(&v2(0x20, 0x11, &body), Versions::V2).unwrap();
            assert!(local.tlvs.is_empty(), "LOCAL {bad_tlvs:?}");
            assert!(
                is_invalid(parse(&v2(0x21, 0x00, bad_tlvs), Versions::V2)),
                "UNSPEC {bad_tlvs:?}"
            );
        }
    }

    #[test]
    fn v2_local_ignores_addresses() {
        let mut body = V2_TCP4[16..].to_vec();
        body.extend(tlv(PP2_TYPE_UNIQUE_ID, b"hc"));
        let h = parse(&v2(0x20, 0x11, &body), Versions::V2).unwrap();
        assert_eq!(h.command, Command::Local);
        assert_eq!(h.addresses, None);
        assert_eq!(h.tlvs, tlv(PP2_TYPE_UNIQUE_ID, b"hc"));
        assert_eq!(h.len, 16 + body.len());
        // The usual health check: LOCAL, UNSPEC, no body.
        let h = parse(&v2(0x20, 0x00, &[]), Versions::Auto).unwrap();
        assert_eq!((h.command, h.addresses, h.len), (Command::Local, None, 16));
    }

    #[test]
    fn v2_unspec_has_no_addresses_and_udp_unix_are_refused() {
        let t = tlv(PP2_TYPE_AUTHORITY, b"x");
        let h = parse(&v2(0x21, 0x00, &t), Versions::V2).unwrap();
        assert_eq!((h.command, h.addresses, &h.tlvs), (Command::Proxy, None, &t));
        let cases = [
            (0x12, [&V2_TCP4[16..], &t[..]].concat()),
            (0x22, [&V2_TCP6[16..], &t[..]].concat()),
            (0x31, [&[b'/'; 216][..], &t[..]].concat()),
            (0x32, [&[0; 216][..], &t[..]].concat()),
        ];
        for (fam, body) in cases {
            let e = parse(&v2(0x21, fam, &body), Versions::V2).unwrap_err();
            assert_eq!(e, invalid("v2 PROXY for a UDP or unix socket on a TCP connection"), "{fam:#x}");
            // As LOCAL, the family is ignored.
            let h = parse(&v2(0x20, fam, &body), Versions::V2).unwrap();
            assert_eq!((h.command, h.addresses), (Command::Local, None), "{fam:#x}");
        }
    }

    #[test]
    fn v2_local_takes_any_family_and_length() {
        // HAProxy's check: LOCAL, TCP over IPv4, no address block.
        let h = parse(&v2(0x20, 0x11, &[]), Versions::V2).unwrap();
        assert_eq!((h.command, h.addresses, h.len, h.tlvs.len()), (Command::Local, None, 16, 0));
        for fam in [0x00, 0x11, 0x21, 0x45, 0xFF] {
            for n in [0, 3, 12, 40] {
                let h = parse(&v2(0x20, fam, &vec![7; n]), Versions::Auto).unwrap();
                assert_eq!((h.command, h.addresses, h.len), (Command::Local, None, 16 + n), "{fam:#x} {n}");
            }
        }
    }

    #[test]
    fn a_v2_length_beyond_the_limit_is_refused_from_the_prefix() {
        let mut body = V2_TCP4[16..].to_vec();
        body.extend(tlv(PP2_TYPE_NOOP, &[0; 1985]));
        let h = v2(0x21, 0x11, &body);
        assert_eq!(parse_within(&h[..16], Versions::Auto, 1024), Err(ParseError::TooLong));
        assert_eq!(parse_within(&h[..15], Versions::Auto, 1024), Err(ParseError::Incomplete));
        assert_eq!(parse_within(&h[..16], Versions::Auto, 4096), Err(ParseError::Incomplete));
        assert!(parse_within(&h, Versions::Auto, 4096).is_ok());
    }

    #[test]
    fn v2_crc_tlv_is_kept_in_header_but_not_reemitted() {
        let mut body = V2_TCP4[16..].to_vec();
        body.extend(tlv(PP2_TYPE_CRC32C, &[0xDE, 0xAD, 0xBE, 0xEF]));
        body.extend(tlv(PP2_TYPE_ALPN, b"mqtt"));
        let h = parse(&v2(0x21, 0x11, &body), Versions::V2).unwrap();
        assert_eq!(tlvs(&h.tlvs).count(), 2);
        assert_eq!(tlvs_for_reemit(&h.tlvs), tlv(PP2_TYPE_ALPN, b"mqtt"));
    }

    #[test]
    fn error_display() {
        assert_eq!(
            ParseError::Invalid("bad v1 source port".into()).to_string(),
            "invalid PROXY protocol header: bad v1 source port"
        );
        assert_eq!(
            ParseError::TooLong.to_string(),
            "PROXY protocol header too long"
        );
    }

    // ---- properties ----

    fn any_v4() -> impl Strategy<Value = SocketAddr> {
        (any::<[u8; 4]>(), any::<u16>()).prop_map(SocketAddr::from)
    }

    fn any_v6() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 16]>(), any::<u16>()).prop_map(SocketAddr::from),
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::from((Ipv4Addr::from(ip).to_ipv6_mapped(), p))),
            // Runs of zeros exercise `::` compression.
            (any::<[bool; 8]>(), any::<u16>()).prop_map(|(z, p)| {
                let segs = z.map(|zero| if zero { 0 } else { 0xABCD });
                SocketAddr::from((Ipv6Addr::from(segs), p))
            }),
        ]
    }

    fn any_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![any_v4(), any_v6()]
    }

    fn any_tlvs() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
        prop::collection::vec(
            (any::<u8>(), prop::collection::vec(any::<u8>(), 0..40)),
            0..6,
        )
    }

    fn encode(list: &[(u8, Vec<u8>)]) -> Vec<u8> {
        list.iter().flat_map(|(t, v)| tlv(*t, v)).collect()
    }

    /// Arbitrary bytes, alone or after something that looks like a header start.
    fn header_like() -> impl Strategy<Value = Vec<u8>> {
        let prefixes: Vec<Vec<u8>> = vec![
            vec![],
            b"PROXY ".to_vec(),
            b"PROXY TCP4 ".to_vec(),
            b"PROXY TCP6 ".to_vec(),
            b"PROXY UNKNOWN".to_vec(),
            V2_SIGNATURE.to_vec(),
            [&V2_SIGNATURE[..], &[0x21, 0x11]].concat(),
            [&V2_SIGNATURE[..], &[0x20, 0x00]].concat(),
        ];
        let v1ish = prop::collection::vec(
            prop::sample::select(b"0123456789abcdef:. \r\n".to_vec()),
            0..120,
        );
        prop_oneof![
            (
                prop::sample::select(prefixes),
                prop::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(p, rest)| [p, rest].concat()),
            (
                prop::sample::select(vec!["TCP4 ", "TCP6 ", "UNKNOWN"]),
                v1ish
            )
                .prop_map(|(p, rest)| [b"PROXY ", p.as_bytes(), &rest].concat()),
            // A real header with one byte changed and some trailing data.
            (
                any_addr(),
                any_addr(),
                any_tlvs(),
                any::<bool>(),
                any::<prop::sample::Index>(),
                any::<u8>(),
                prop::collection::vec(any::<u8>(), 0..20)
            )
                .prop_map(|(s, d, list, v1, at, byte, tail)| {
                    let mut h = if v1 {
                        build_v1(s, d)
                    } else {
                        build_v2(s, d, &encode(&list))
                    };
                    let i = at.index(h.len());
                    h[i] = byte;
                    [h, tail].concat()
                }),
            // Well-formed v2 framing around a random body, so TLV checks run.
            (
                any::<u8>(),
                prop::sample::select(vec![0x00u8, 0x11, 0x12, 0x21, 0x22, 0x31]),
                prop::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(vc, fam, body)| v2(0x20 | (vc & 1), fam, &body)),
        ]
    }

    proptest! {
        #[test]
        fn v1_round_trip(src in any_addr(), dst in any_addr(), extra in prop::collection::vec(any::<u8>(), 0..20)) {
            let hdr = build_v1(src, dst);
            prop_assert!(hdr.len() <= V1_MAX_LEN);
            let mut buf = hdr.clone();
            buf.extend_from_slice(&extra);
            for a in [Versions::V1, Versions::Auto] {
                let h = parse(&buf, a).unwrap();
                prop_assert_eq!(h.version, Version::V1);
                prop_assert_eq!(h.addresses, Some(normalize(src, dst)));
                prop_assert_eq!(h.len, hdr.len());
                prop_assert!(h.tlvs.is_empty());
            }
        }

        #[test]
        fn v2_round_trip(src in any_addr(), dst in any_addr(), list in any_tlvs()) {
            let raw = encode(&list);
            let hdr = build_v2(src, dst, &raw);
            let h = parse(&hdr, Versions::V2).unwrap();
            prop_assert_eq!(h.version, Version::V2);
            prop_assert_eq!(h.command, Command::Proxy);
            prop_assert_eq!(h.addresses, Some(normalize(src, dst)));
            prop_assert_eq!(h.len, hdr.len());
            prop_assert_eq!(&h.tlvs, &raw);
            let back: Vec<(u8, Vec<u8>)> = tlvs(&h.tlvs).map(|(t, v)| (t, v.to_vec())).collect();
            prop_assert_eq!(&back, &list);
            let kept: Vec<(u8, Vec<u8>)> = list.iter()
                .filter(|(t, _)| *t != PP2_TYPE_CRC32C && *t != PP2_TYPE_NOOP)
                .cloned()
                .collect();
            prop_assert_eq!(tlvs_for_reemit(&h.tlvs), encode(&kept));
            // Same family rule in both versions.
            let v1 = parse(&build(Version::V1, src, dst), Versions::Auto).unwrap();
            prop_assert_eq!(v1.addresses, h.addresses);
        }

        #[test]
        fn truncated_builds_are_incomplete(src in any_addr(), dst in any_addr(), list in any_tlvs(), cut in any::<prop::sample::Index>()) {
            for hdr in [build_v1(src, dst), build_v2(src, dst, &encode(&list))] {
                let n = cut.index(hdr.len());
                prop_assert_eq!(parse(&hdr[..n], Versions::Auto), Err(ParseError::Incomplete));
            }
        }

        #[test]
        fn parse_never_panics(buf in prop::collection::vec(any::<u8>(), 0..400)) {
            for a in ACCEPTS {
                let _ = parse(&buf, a);
            }
            let _ = tlvs(&buf).count();
            let _ = tlvs_for_reemit(&buf);
        }

        /// A verdict other than Incomplete never changes as more bytes arrive,
        /// which also means Incomplete is only given to a prefix that can
        /// still become a valid header.
        #[test]
        fn verdicts_are_final(buf in header_like()) {
            for a in ACCEPTS {
                let full = parse(&buf, a);
                if let Ok(h) = &full {
                    prop_assert!(h.len <= buf.len());
                    prop_assert_eq!(tlvs(&h.tlvs).map(|(_, v)| 3 + v.len()).sum::<usize>(), h.tlvs.len());
                }
                for n in 0..buf.len() {
                    match parse(&buf[..n], a) {
                        Err(ParseError::Incomplete) => {}
                        Ok(h) => prop_assert_eq!(&full, &Ok(h)),
                        Err(e) => prop_assert!(
                            matches!(full, Err(ref f) if *f != ParseError::Incomplete),
                            "{:?} then {:?}", e, full
                        ),
                    }
                }
            }
        }
    }
}
