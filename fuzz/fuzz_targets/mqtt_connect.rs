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
#![no_main]

use libfuzzer_sys::fuzz_target;
use splicer_proto::mqtt::parse_connect;

const MAX: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() < 100 {
        let mut framed = vec![0x10, 7 + data.len() as u8, 0, 4, b'M', b'Q', b'T', b'T', 5];
        framed.extend_from_slice(data);
        check(&framed);
    }
});

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
