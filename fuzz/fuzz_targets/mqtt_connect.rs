//! Coverage-guided fuzzing of the MQTT CONNECT parser
//! (`splicer_proto::mqtt`, the code `protocol = "mqtt"` listeners will run).
//!
//! `cargo +nightly fuzz run mqtt_connect` from this directory; `cargo xtask
//! test` runs it for 30 s.
//!
//! Each input is tried twice: as it is, and as the rest of an MQTT 5
//! CONNECT whose fixed header and protocol name are valid (random bytes
//! rarely start with them, so this is what reaches the flags, properties
//! and payload).
//!
//! The `mqtt-ws` reader (`preamble::MqttConnectInWs`) gets each input
//! too: as raw WebSocket bytes, whole and a byte at a time (the same
//! CONNECT or a refusal either way), and wrapped in masked binary frames
//! cut where the input says (the same answer as the plain parser).
#![no_main]

use libfuzzer_sys::fuzz_target;
use splicer_proto::{
    mqtt::parse_connect,
    preamble::{MqttConnectInWs, Reader, Step},
};

const MAX: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    check(data);
    in_websocket(data);
    if data.len() < 100 {
        let mut framed = vec![0x10, 7 + data.len() as u8, 0, 4, b'M', b'Q', b'T', b'T', 5];
        framed.extend_from_slice(data);
        check(&framed);
        in_websocket(&framed);
    }
});

/// The WebSocket reader on `data` as raw frames (whole, then a byte at a
/// time: the same CONNECT, or both refuse), and on `data` put in masked
/// binary frames of the sizes its bytes give (the plain parser's answer).
fn in_websocket(data: &[u8]) {
    let whole = MqttConnectInWs::new(MAX).step(data);
    let mut r = MqttConnectInWs::new(MAX);
    for k in 1..=data.len() {
        match (r.step(&data[..k]), &whole) {
            (Step::More, _) => continue,
            (Step::Done(c, len), Step::Done(w, _)) => assert!(c == *w && len <= k),
            (Step::Fail(_), Step::Fail(_)) => {}
            (one, whole) => panic!("a byte at a time: {one:?}, whole: {whole:?}"),
        }
        break;
    }
    let mut frames = Vec::new();
    let (mut at, mut i) = (0, 0);
    while at < data.len() {
        let n = (usize::from(data[i % data.len()]) % 40 + 1).min(data.len() - at);
        let (first, mask) = (if at == 0 { 0x02 } else { 0x00 }, [i as u8, 0x5a, 0xa5, 7]);
        frames.push(first | if at + n == data.len() { 0x80 } else { 0 });
        frames.push(0x80 | n as u8);
        frames.extend(mask);
        frames.extend(data[at..at + n].iter().enumerate().map(|(j, b)| b ^ mask[j % 4]));
        at += n;
        i += 1;
    }
    let plain = parse_connect(data, MAX);
    match (MqttConnectInWs::new(MAX).step(&frames), plain) {
        (Step::Done(c, _), Ok(Some(p))) => assert_eq!(c, p),
        (Step::Fail(e), Err(p)) => assert_eq!(e, p),
        (Step::More, Ok(None)) => {}
        (ws, plain) => panic!("in frames: {ws:?}, plain: {plain:?}"),
    }
}

/// A CONNECT found is the whole of its own prefix and every shorter prefix
/// needs more; a refusal stays one whatever bytes follow.
fn check(data: &[u8]) {
    match parse_connect(data, MAX) {
        Ok(Some(c)) => {
            assert!(c.len <= data.len());
            assert_eq!(parse_connect(&data[..c.len], MAX), Ok(Some(c.clone())));
            for cut in 0..c.len {
                assert_eq!(parse_connect(&data[..cut], MAX), Ok(None), "prefix of {cut}");
            }
        }
        Err(r) => {
            let mut more = data.to_vec();
            more.extend_from_slice(&[0; 8]);
            let again = parse_connect(&more, MAX);
            assert!(again.is_err(), "{r:?}, then with more bytes {again:?}");
        }
        Ok(None) => {}
    }
}
