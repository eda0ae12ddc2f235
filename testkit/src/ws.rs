//! The client's side of WebSocket (RFC 6455), as much as the tests need to
//! talk through a WebSocket proxy: the handshake's key and accept values,
//! and frames with or without a mask. The upgrade request itself is left
//! to each test, which is usually checking exactly those bytes.
use std::io::{self, Read};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use sha1::{Digest as _, Sha1};

/// Opcodes used here.
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;

/// Sec-WebSocket-Key for a 16-byte nonce.
pub fn key(nonce: &[u8; 16]) -> String {
    STANDARD.encode(nonce)
}

/// The Sec-WebSocket-Accept a server must answer `key` with.
pub fn accept(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    STANDARD.encode(h.finalize())
}

/// One final (FIN) frame: `opcode` and `payload`, masked with `mask` if
/// given (a client must mask, a server must not).
pub fn frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(m | n as u8),
        n if n <= 0xffff => {
            f.push(m | 126);
            f.extend((n as u16).to_be_bytes());
        }
        n => {
            f.push(m | 127);
            f.extend((n as u64).to_be_bytes());
        }
    }
    if let Some(k) = mask {
        f.extend(k);
    }
    let start = f.len();
    f.extend_from_slice(payload);
    if let Some(k) = mask {
        unmask(&mut f[start..], k);
    }
    f
}

/// A frame header as read off the wire.
#[derive(Debug, PartialEq, Eq)]
pub struct Header {
    /// The first byte: FIN, RSV and opcode (0x82 for a final binary frame).
    pub first: u8,
    /// The masking key, if the mask bit was set.
    pub mask: Option<[u8; 4]>,
    /// Payload length.
    pub len: u64,
}

/// Reads one frame header (through the masking key). The payload is left
/// to the caller, who can check the length before reading that much.
pub fn read_header(r: &mut impl Read) -> io::Result<Header> {
    let mut h = [0u8; 2];
    r.read_exact(&mut h)?;
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)?;
            u16::from_be_bytes(b).into()
        }
        127 => {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            u64::from_be_bytes(b)
        }
        n => n.into(),
    };
    let mut mask = None;
    if h[1] & 0x80 != 0 {
        let mut k = [0u8; 4];
        r.read_exact(&mut k)?;
        mask = Some(k);
    }
    Ok(Header {
        first: h[0],
        mask,
        len,
    })
}

/// XORs a payload with its masking key, which masks and unmasks alike.
pub fn unmask(payload: &mut [u8], key: [u8; 4]) {
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_of_the_rfc_example() {
        // RFC 6455 section 1.3.
        assert_eq!(
            accept("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(key(b"the sample nonce"), "dGhlIHNhbXBsZSBub25jZQ==");
    }

    #[test]
    fn frames_round_trip() {
        let key = [1, 2, 3, 4];
        // The three length encodings: 7 bits, 16 bits, 64 bits.
        for len in [0, 125, 126, 0xffff, 0x10000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            for mask in [None, Some(key)] {
                let f = frame(BINARY, &payload, mask);
                let mut r = &f[..];
                let h = read_header(&mut r).unwrap();
                assert_eq!(
                    h,
                    Header {
                        first: 0x82,
                        mask,
                        len: len as u64
                    }
                );
                let mut got = r.to_vec();
                if let Some(k) = h.mask {
                    assert!(len == 0 || got != payload, "not masked");
                    unmask(&mut got, k);
                }
                assert_eq!(got, payload);
            }
        }
        assert_eq!(frame(CLOSE, &[], Some(key)), [0x88, 0x80, 1, 2, 3, 4]);
    }
}
