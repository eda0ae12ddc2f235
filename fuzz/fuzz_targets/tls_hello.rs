//! Coverage-guided fuzzing of the TLS ClientHello reader
//! (`splicer_proto::tls_hello`, what `tls-passthrough` listeners run).
//!
//! `cargo +nightly fuzz run tls_hello` from this directory; `cargo xtask
//! test` runs it for 30 s.
//!
//! Each input is tried as it is (records and all), fed whole and a byte at
//! a time (the same answer either way), and as the body of a ClientHello
//! in valid records cut where its first byte says (random bytes rarely
//! make a record header, so this is what reaches the extensions).
#![no_main]

use libfuzzer_sys::fuzz_target;
use splicer_fuzz::segmented;
use splicer_proto::{preamble::TlsClientHello, tls_hello::parse_client_hello};

const MAX: usize = 16 << 10;

fuzz_target!(|data: &[u8]| {
    check(data);
    if !data.is_empty() && data.len() < 4096 {
        let chunk = usize::from(data[0]) * 16 + 1;
        let mut message = vec![0x01];
        message.extend(&(data.len() as u32 - 1).to_be_bytes()[1..]);
        message.extend(&data[1..]);
        let records: Vec<u8> = message
            .chunks(chunk)
            .flat_map(|c| {
                let mut r = vec![0x16, 3, 1];
                r.extend((c.len() as u16).to_be_bytes());
                r.extend(c);
                r
            })
            .collect();
        check(&records);
    }
});

/// A hello found is the whole of its records' prefix and every shorter
/// prefix needs more; the reader fed a byte at a time agrees with the whole.
fn check(data: &[u8]) {
    if let Ok(Some(h)) = parse_client_hello(data, MAX) {
        assert!(h.len <= data.len());
        assert_eq!(parse_client_hello(&data[..h.len], MAX), Ok(Some(h.clone())));
        for cut in 0..h.len {
            assert_eq!(parse_client_hello(&data[..cut], MAX), Ok(None), "prefix of {cut}");
        }
        if let Some(name) = &h.sni {
            assert!(name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-._:".contains(&c)));
        }
    }
    segmented(|| TlsClientHello::new(MAX), data);
}
