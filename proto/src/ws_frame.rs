//! WebSocket frames (RFC 6455 5.2) as a client sends them, read far enough
//! to take the MQTT CONNECT out of the first ones on `mqtt-ws` listeners;
//! and the few frames a server sends to refuse one.
//!
//! No extension is in effect on those listeners (splicer removes
//! Sec-WebSocket-Extensions from the upgrade request), so a frame with an
//! RSV bit set is malformed, as is an unmasked client frame.

/// Opcodes (5.2).
pub const CONTINUATION: u8 = 0x0;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xa;

/// A client frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub fin: bool,
    pub opcode: u8,
    pub mask: [u8; 4],
    /// Header bytes, the masking key included.
    pub len: usize,
    pub payload_len: u64,
}

/// The header of the client frame at the front of `buf`: None until it
/// has all arrived; Err for what no client may send.
pub fn client_head(buf: &[u8]) -> Result<Option<Head>, &'static str> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err("WebSocket frame with an RSV bit set (no extension was agreed)");
    }
    let opcode = b0 & 0x0f;
    if !matches!(opcode, CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG) {
        return Err("WebSocket frame with a reserved opcode");
    }
    if b1 & 0x80 == 0 {
        return Err("unmasked WebSocket frame from a client");
    }
    let (payload_len, at) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => (u64::from_be_bytes(b.try_into().expect("8 bytes")), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if opcode >= CLOSE && (payload_len > 125 || b0 & 0x80 == 0) {
        return Err("fragmented or over-long WebSocket control frame");
    }
    let Some(mask) = buf.get(at..at + 4) else {
        return Ok(None);
    };
    Ok(Some(Head {
        fin: b0 & 0x80 != 0,
        opcode,
        mask: mask.try_into().expect("4 bytes"),
        len: at + 4,
        payload_len,
    }))
}

/// A final, unmasked frame as a server sends it (a payload under 126
/// bytes: a CONNACK, a Close).
pub fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126, "short server frames only");
    let mut f = vec![0x80 | opcode, payload.len() as u8];
    f.extend_from_slice(payload);
    f
}

/// A Close frame with a status code (7.4.1): 1002 protocol error, 1009
/// message too big.
pub fn close_frame(status: u16) -> Vec<u8> {
    server_frame(CLOSE, &status.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let h = client_head(&[0x82, 0x85, 1, 2, 3, 4, 0]).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode, h.mask, h.len, h.payload_len), (true, BINARY, [1, 2, 3, 4], 6, 5));
        let h = client_head(&[0x02, 0xfe, 0x01, 0x00, 9, 9, 9, 9]).unwrap().unwrap();
        assert_eq!((h.fin, h.len, h.payload_len), (false, 8, 256));
        let long = [&[0x82, 0xff][..], &300_000u64.to_be_bytes(), &[1, 2, 3, 4]].concat();
        assert_eq!(client_head(&long).unwrap().unwrap().payload_len, 300_000);
        for cut in 0..long.len() {
            assert_eq!(client_head(&long[..cut]), Ok(None), "{cut}");
        }
        assert!(client_head(&[0x82, 0x05]).is_err(), "unmasked");
        assert!(client_head(&[0xc2, 0x85]).is_err(), "RSV1");
        assert!(client_head(&[0x83, 0x85]).is_err(), "opcode 3");
        assert!(client_head(&[0x09, 0x80]).is_err(), "fragmented ping");
        assert!(client_head(&[0x89, 0xfe, 0, 126]).is_err(), "long ping");
        assert_eq!(close_frame(1002), [0x88, 0x02, 0x03, 0xea]);
    }
}
