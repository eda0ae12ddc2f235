//! The TLS ClientHello a client sends first on a `tls-passthrough`
//! listener (issue 14), read without terminating TLS: for the server name
//! (SNI) that picks the upstream group, and the ALPN protocols offered.
//! RFC 8446 4.1.2 (and RFC 5246 7.4.1.2 for TLS 1.2), RFC 6066 3 (SNI),
//! RFC 7301 3.1 (ALPN). The bytes go to the broker unchanged.
//!
//! Written here rather than taken from rustls (whose `Acceptor` wants the
//! bytes copied into its own buffer and answers an alert on failure, which
//! is not ours to send on a connection we do not terminate) or tls-parser
//! (nom-based, and a much larger surface than three fields need). Like the
//! PROXY and MQTT parsers it says whether more bytes are needed.
use std::fmt;

/// A ClientHello as read. `len` is how many bytes of records it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The name asked for, lowercased, without a trailing dot: a host name,
    /// or an IP literal (which RFC 6066 does not allow, but OpenSSL-based
    /// clients such as libmosquitto send when given one). None when the
    /// client sent no server_name, or one that is neither (the terminating
    /// server decides what to make of it).
    pub sni: Option<String>,
    /// ALPN protocol names offered, in the client's order (at most
    /// MAX_ALPN; an ALPN list that does not parse is taken as none: it is
    /// the terminating server's to refuse).
    pub alpn: Vec<String>,
    /// Record bytes up to the end of the record that completed it.
    pub len: usize,
}

/// Why the first bytes are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a TLS handshake record (plaintext MQTT or HTTP on a TLS port,
    /// an SSLv2 hello, garbage).
    NotTls,
    /// A handshake that breaks the specification; says where.
    Malformed(&'static str),
    /// Longer than the limit.
    TooLarge,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotTls => f.write_str("first bytes are not a TLS ClientHello"),
            Refusal::Malformed(what) => write!(f, "malformed ClientHello: {what}"),
            Refusal::TooLarge => f.write_str("ClientHello longer than the limit"),
        }
    }
}

/// Largest TLS record payload (RFC 8446 5.1).
const MAX_RECORD: usize = 1 << 14;
/// ALPN names kept.
const MAX_ALPN: usize = 16;
const HANDSHAKE: u8 = 0x16;
const CLIENT_HELLO: u8 = 0x01;
const SERVER_NAME: u16 = 0;
const ALPN: u16 = 16;

/// Reads a ClientHello from the handshake records at the front of `buf`,
/// at most `max` bytes of handshake message: Ok(None) while incomplete,
/// Err as soon as the bytes so far cannot become one.
pub fn parse_client_hello(buf: &[u8], max: usize) -> Result<Option<ClientHello>, Refusal> {
    Records::new(max).feed(buf)
}

/// A ClientHello being gathered from its records as they arrive: each
/// record is taken once, whole, so the work is in proportion to the bytes
/// however they are cut; the message is parsed once, when whole. (The
/// message may span records.) Record headers do not count toward `max`,
/// but the records may take at most twice it, so a client cannot hold a
/// handshake's buffer with tiny records.
#[derive(Debug)]
pub struct Records {
    max: usize,
    /// The handshake message's bytes so far.
    message: Vec<u8>,
    /// Record bytes taken (whole records only).
    at: usize,
}

impl Records {
    pub fn new(max: usize) -> Records {
        Records {
            max,
            message: Vec::new(),
            at: 0,
        }
    }

    /// `buf` is every byte received so far; between calls it only grows.
    pub fn feed(&mut self, buf: &[u8]) -> Result<Option<ClientHello>, Refusal> {
        loop {
            let at = self.at;
            let Some(header) = buf.get(at..at + 5) else {
                // A record header cut short: its first bytes still say
                // whether this is TLS.
                return match (buf.get(at), buf.get(at + 1)) {
                    (Some(&t), _) if t != HANDSHAKE => Err(self.not_handshake()),
                    (_, Some(&v)) if v != 3 => Err(self.not_handshake()),
                    _ => Ok(None),
                };
            };
            if header[0] != HANDSHAKE || header[1] != 3 {
                return Err(self.not_handshake());
            }
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if len == 0 || len > MAX_RECORD {
                return Err(Malformed("record length"));
            }
            if at + 5 + len > 2 * self.max {
                return Err(Refusal::TooLarge);
            }
            let Some(payload) = buf.get(at + 5..at + 5 + len) else {
                // Refuse early what cannot fit, from the message's header.
                let mut head = self.message[..self.message.len().min(4)].to_vec();
                head.extend(buf[at + 5..].iter().take(4 - head.len()));
                return check_message_start(&head, self.max).map(|()| None);
            };
            self.message.extend_from_slice(payload);
            self.at += 5 + len;
            check_message_start(&self.message, self.max)?;
            if self.message.len() >= 4 {
                let total = 4 + message_len(&self.message);
                if self.message.len() > total {
                    return Err(Malformed("bytes after the ClientHello in its records"));
                }
                if self.message.len() == total {
                    let mut hello = body(&self.message[4..])?;
                    hello.len = self.at;
                    return Ok(Some(hello));
                }
            }
        }
    }

    /// A record that is not a TLS handshake: not TLS at all if it is the
    /// first, malformed inside a ClientHello.
    fn not_handshake(&self) -> Refusal {
        match self.at {
            0 => Refusal::NotTls,
            _ => Malformed("a record other than a handshake inside the ClientHello"),
        }
    }
}

use Refusal::Malformed;

/// The handshake message's declared body length.
fn message_len(m: &[u8]) -> usize {
    usize::from(m[1]) << 16 | usize::from(m[2]) << 8 | usize::from(m[3])
}

/// A handshake message's first bytes: a ClientHello, no longer than `max`.
fn check_message_start(m: &[u8], max: usize) -> Result<(), Refusal> {
    match m.first() {
        Some(&CLIENT_HELLO) | None => {}
        Some(_) => return Err(Malformed("first handshake message is not a ClientHello")),
    }
    if m.len() >= 4 && 4 + message_len(m) > max {
        return Err(Refusal::TooLarge);
    }
    Ok(())
}

/// The ClientHello body: legacy version, random, session ID, cipher
/// suites, compression methods, then the extensions.
fn body(b: &[u8]) -> Result<ClientHello, Refusal> {
    let mut r = Cursor { b, at: 0 };
    let version = r.u16()?;
    if version >> 8 != 3 {
        return Err(Malformed("legacy version"));
    }
    r.take(32)?; // random
    if r.vec8()?.len() > 32 {
        return Err(Malformed("session ID longer than 32 bytes"));
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(Malformed("cipher suites"));
    }
    if r.vec8()?.is_empty() {
        return Err(Malformed("no compression method"));
    }
    let mut hello = ClientHello {
        sni: None,
        alpn: Vec::new(),
        len: 0,
    };
    // TLS 1.2 allows a hello without extensions.
    if r.at == b.len() {
        return Ok(hello);
    }
    let mut exts = Cursor { b: r.vec16()?, at: 0 };
    if r.at != b.len() {
        return Err(Malformed("bytes after the extensions"));
    }
    // One bit per extension type: a repeat is refused in constant time.
    let mut seen = [0u64; 1024];
    while exts.at < exts.b.len() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        let (word, bit) = (usize::from(kind / 64), 1u64 << (kind % 64));
        if seen[word] & bit != 0 {
            return Err(Malformed("an extension given twice"));
        }
        seen[word] |= bit;
        match kind {
            SERVER_NAME => hello.sni = server_name(data)?,
            ALPN => hello.alpn = alpn(data),
            _ => {}
        }
    }
    Ok(hello)
}

/// The server_name extension: a list of (type, name) entries, of which
/// only host_name (type 0) is defined (RFC 6066 3: no two of one type).
/// The list's framing must hold; a name that is neither a host name nor
/// an IP literal is taken as no name.
fn server_name(data: &[u8]) -> Result<Option<String>, Refusal> {
    let mut d = Cursor { b: data, at: 0 };
    let mut list = Cursor { b: d.vec16()?, at: 0 };
    if d.at != data.len() {
        return Err(Malformed("server_name list"));
    }
    let mut name = None;
    let mut host_names = 0;
    while list.at < list.b.len() {
        let kind = list.u8()?;
        let value = list.vec16()?;
        if kind != 0 {
            continue; // other name types: none defined, skipped
        }
        host_names += 1;
        name = usable_name(value);
    }
    if host_names > 1 {
        return Err(Malformed("two host names"));
    }
    Ok(name)
}

/// A DNS host name (letters, digits, hyphens and underscores in
/// dot-separated labels of 1 to 63 bytes that neither start nor end with a
/// hyphen, 253 at most) or an IP literal; lowercased, one trailing dot
/// dropped. Only these characters reach a log line.
fn usable_name(v: &[u8]) -> Option<String> {
    let v = v.strip_suffix(b".").unwrap_or(v);
    let text = std::str::from_utf8(v).ok()?;
    let host = !v.is_empty()
        && v.len() <= 253
        && v.split(|&c| c == b'.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with(b"-")
                && !label.ends_with(b"-")
                && label.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        });
    match host {
        true => Some(text.to_ascii_lowercase()),
        false => text.parse::<std::net::IpAddr>().ok().map(|ip| ip.to_string()),
    }
}

/// The ALPN extension's names, at most MAX_ALPN; empty if it does not
/// parse as a list of non-empty names.
fn alpn(data: &[u8]) -> Vec<String> {
    let mut d = Cursor { b: data, at: 0 };
    let Ok(list) = d.vec16() else {
        return Vec::new();
    };
    let mut list = Cursor { b: list, at: 0 };
    let mut names = Vec::new();
    while list.at < list.b.len() {
        match list.vec8() {
            Ok(name) if !name.is_empty() => names.push(String::from_utf8_lossy(name).into_owned()),
            _ => return Vec::new(),
        }
    }
    names.truncate(MAX_ALPN);
    names
}

/// A cursor over a whole message: running out of bytes is malformed (the
/// message's length said they were there).
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Refusal> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or(Malformed("a field runs past its message"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, Refusal> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Refusal> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn vec8(&mut self) -> Result<&'a [u8], Refusal> {
        let n = self.u8()?;
        self.take(n.into())
    }

    fn vec16(&mut self) -> Result<&'a [u8], Refusal> {
        let n = self.u16()?;
        self.take(n.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello body with these extensions.
    fn hello_body(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut b = vec![3, 3];
        b.extend([7u8; 32]);
        b.push(0); // no session ID
        b.extend([0, 2, 0x13, 0x01]); // one suite
        b.extend([1, 0]); // null compression
        let mut e = Vec::new();
        for (kind, data) in exts {
            e.extend(kind.to_be_bytes());
            e.extend((data.len() as u16).to_be_bytes());
            e.extend(data);
        }
        b.extend((e.len() as u16).to_be_bytes());
        b.extend(e);
        b
    }

    fn sni(name: &[u8]) -> (u16, Vec<u8>) {
        let mut entry = vec![0];
        entry.extend((name.len() as u16).to_be_bytes());
        entry.extend(name);
        let mut d = (entry.len() as u16).to_be_bytes().to_vec();
        d.extend(entry);
        (SERVER_NAME, d)
    }

    fn alpn_ext(names: &[&str]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for n in names {
            list.push(n.len() as u8);
            list.extend(n.as_bytes());
        }
        let mut d = (list.len() as u16).to_be_bytes().to_vec();
        d.extend(list);
        (ALPN, d)
    }

    /// The message in records of at most `chunk` payload bytes.
    fn records(body: &[u8], chunk: usize) -> Vec<u8> {
        let mut m = vec![CLIENT_HELLO];
        m.extend(&(body.len() as u32).to_be_bytes()[1..]);
        m.extend(body);
        m.chunks(chunk)
            .flat_map(|c| {
                let mut r = vec![HANDSHAKE, 3, 1];
                r.extend((c.len() as u16).to_be_bytes());
                r.extend(c);
                r
            })
            .collect()
    }

    const MAX: usize = 16 << 10;

    #[test]
    fn reads_sni_and_alpn_whatever_the_records_and_prefixes() {
        let body = hello_body(&[(0x000a, vec![0, 2, 0, 0x1d]), sni(b"Broker.Example.COM."), alpn_ext(&["mqtt", "h2"])]);
        for chunk in [1, 7, 100, MAX_RECORD] {
            let bytes = records(&body, chunk);
            for cut in 0..bytes.len() {
                assert_eq!(parse_client_hello(&bytes[..cut], MAX), Ok(None), "{chunk}: {cut}");
            }
            let mut with_more = bytes.clone();
            with_more.extend([0x17, 3, 3, 0, 1, 0]); // early data behind it
            let h = parse_client_hello(&with_more, MAX).unwrap().unwrap();
            assert_eq!(h.sni.as_deref(), Some("broker.example.com"));
            assert_eq!(h.alpn, ["mqtt", "h2"]);
            assert_eq!(h.len, bytes.len());
        }
    }

    #[test]
    fn a_hello_without_extensions_or_sni_has_no_name() {
        let mut body = hello_body(&[]);
        body.truncate(body.len() - 2); // TLS 1.2: no extensions block at all
        assert_eq!(parse_client_hello(&records(&body, MAX_RECORD), MAX).unwrap().unwrap().sni, None);
        let body = hello_body(&[alpn_ext(&["mqtt"])]);
        assert_eq!(parse_client_hello(&records(&body, MAX_RECORD), MAX).unwrap().unwrap().sni, None);
    }

    #[test]
    fn refuses_what_is_not_a_client_hello() {
        let refused = |b: &[u8]| parse_client_hello(b, MAX).unwrap_err();
        assert_eq!(refused(b"\x10\x0f\x00\x04MQTT"), Refusal::NotTls);
        assert_eq!(refused(b"GET / HTTP/1.1\r\n"), Refusal::NotTls);
        assert_eq!(refused(&[0x80, 0x2e, 0x01]), Refusal::NotTls, "SSLv2 hello");
        assert_eq!(refused(&[0x16, 0x02]), Refusal::NotTls, "not version 3");
        assert!(matches!(refused(&[0x16, 3, 1, 0, 4, 2, 0, 0, 0]), Malformed(_)), "a ServerHello");
        assert!(matches!(refused(&[0x16, 3, 1, 0x40, 0x01]), Malformed(_)), "record too long");
        assert!(matches!(refused(&[0x16, 3, 1, 0, 0]), Malformed(_)), "empty record");
        let big = [0x16, 3, 1, 0, 4, 1, 0x01, 0, 0];
        assert_eq!(refused(&big), Refusal::TooLarge, "refused from the length alone");
        let twice = hello_body(&[sni(b"a.example"), sni(b"b.example")]);
        assert!(matches!(refused(&records(&twice, MAX_RECORD)), Malformed(_)));
        let parsed = |b: &[u8]| parse_client_hello(&records(&hello_body(&[sni(b)]), MAX_RECORD), MAX);
        // A name that is not one goes to `*`, as no name does.
        for odd in [&b"a..example"[..], b"-", b"a example", b"10.0.0.1:80", b"", b"\xff"] {
            assert_eq!(parsed(odd).unwrap().unwrap().sni, None, "{odd:?}");
        }
        // IP literals, as libmosquitto sends them, are names.
        assert_eq!(parsed(b"10.0.0.1").unwrap().unwrap().sni.as_deref(), Some("10.0.0.1"));
        assert_eq!(parsed(b"FD00::5").unwrap().unwrap().sni.as_deref(), Some("fd00::5"));
        // Tiny records cannot take more than twice the limit.
        let small = hello_body(&[sni(b"a.example")]);
        assert!(parse_client_hello(&records(&small, MAX_RECORD), 100).is_ok_and(|h| h.is_some()));
        assert_eq!(parse_client_hello(&records(&small, 1), 100), Err(Refusal::TooLarge));
        let mut cut = hello_body(&[sni(b"a.example")]);
        cut.pop();
        assert!(matches!(refused(&records(&cut, MAX_RECORD)), Malformed(_)), "extension cut short");
    }
}
