//! MQTT packets as a test or the bench's client writes and reads them:
//! just enough of the wire format to build a CONNECT of any version and
//! read a packet back. (What splicer itself parses is in splicer_proto.)
use std::io::Read;

/// A packet: type and flags, the remaining length (varint), the body.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len() + 5);
    v.push(first);
    splicer_proto::mqtt::put_varint(&mut v, body.len());
    v.extend_from_slice(body);
    v
}

/// A length-prefixed string or binary field.
pub fn put_str(v: &mut Vec<u8>, s: &[u8]) {
    v.extend((s.len() as u16).to_be_bytes());
    v.extend_from_slice(s);
}

/// A CONNECT to build: `Connect::new(4, "id")` is MQTT 3.1.1 (level 4)
/// with a clean session and no keep-alive; level 3 is 3.1, 5 is 5.0.
#[derive(Clone, Debug)]
pub struct Connect<'a> {
    pub level: u8,
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    pub keepalive: u16,
    pub clean: bool,
}

impl<'a> Connect<'a> {
    pub fn new(level: u8, client_id: &'a str) -> Self {
        Connect {
            level,
            client_id,
            username: None,
            password: None,
            keepalive: 0,
            clean: true,
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut body = Vec::new();
        put_str(&mut body, if self.level == 3 { b"MQIsdp" } else { b"MQTT" });
        let flags = u8::from(self.clean) << 1
            | u8::from(self.password.is_some()) << 6
            | u8::from(self.username.is_some()) << 7;
        body.push(self.level);
        body.push(flags);
        body.extend(self.keepalive.to_be_bytes());
        if self.level == 5 {
            body.push(0); // no properties
        }
        put_str(&mut body, self.client_id.as_bytes());
        if let Some(u) = self.username {
            put_str(&mut body, u.as_bytes());
        }
        if let Some(p) = self.password {
            put_str(&mut body, p);
        }
        packet(0x10, &body)
    }
}

/// Reads one packet: its first byte and its body.
pub fn read_packet(r: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    let first = b[0];
    let (mut len, mut shift) = (0usize, 0);
    loop {
        r.read_exact(&mut b)?;
        len |= ((b[0] & 0x7f) as usize) << shift;
        if b[0] & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err(std::io::Error::other("remaining length over 4 bytes"));
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok((first, body))
}
