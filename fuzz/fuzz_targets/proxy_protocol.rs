//! Coverage-guided fuzzing of the PROXY protocol parser and builders
//! (`splicer_proto::proxy_protocol`, the code splicer runs).
//!
//! The listener's reader (`splicer_proto::preamble::ProxyHeader`) is fed
//! each input a byte at a time too.
//!
//! `cargo +nightly fuzz run proxy_protocol` from this directory; `cargo xtask
//! test` runs it for 30 s.
#![no_main]

use libfuzzer_sys::fuzz_target;
use splicer_fuzz::segmented;
use splicer_proto::preamble::ProxyHeader;

use splicer_proto::proxy_protocol::{
    build_v1, build_v2, normalize, parse, tlvs, tlvs_for_reemit, Versions, Header, Version,
    V1_MAX_LEN, V2_HEADER_LEN, V2_MAX_TLVS_LEN,
};

fuzz_target!(|data: &[u8]| {
    for accept in [Versions::V1, Versions::V2, Versions::Auto] {
        if let Ok(h) = parse(data, accept) {
            check(data, accept, &h);
        }
        segmented(|| ProxyHeader::new(accept, 1024), data);
    }
});

fn check(data: &[u8], accept: Versions, h: &Header) {
    assert!(h.len <= data.len(), "len {} > input {}", h.len, data.len());
    match h.version {
        Version::V1 => {
            assert_ne!(accept, Versions::V2, "v1 header with Versions::V2");
            assert!(h.len <= V1_MAX_LEN, "v1 len {}", h.len);
            assert!(h.tlvs.is_empty(), "v1 header with TLVs");
        }
        Version::V2 => {
            assert_ne!(accept, Versions::V1, "v2 header with Versions::V1");
            assert!(h.len >= V2_HEADER_LEN, "v2 len {}", h.len);
        }
    }

    // The header alone parses the same: nothing after it was looked at.
    assert_eq!(
        parse(&data[..h.len], accept).as_ref(),
        Ok(h),
        "header alone"
    );
    // Auto agrees with the listener that accepts only this version.
    if accept == Versions::Auto {
        let only = match h.version {
            Version::V1 => Versions::V1,
            Version::V2 => Versions::V2,
        };
        assert_eq!(parse(data, only).as_ref(), Ok(h), "Auto vs {only:?}");
    }

    // TLVs: each is 3 bytes plus its value, and together they fill h.tlvs.
    // Every TLV takes at least 3 bytes, so more than len/3 means no progress.
    let mut count = 0;
    let mut total = 0;
    for (_, value) in tlvs(&h.tlvs) {
        count += 1;
        assert!(count <= h.tlvs.len() / 3, "tlvs() does not terminate");
        total += 3 + value.len();
    }
    assert_eq!(total, h.tlvs.len(), "TLV lengths do not add up");

    // Re-emitting with the parsed addresses gives them back as `normalize`
    // says: the same addresses, except that IPv4-mapped IPv6 ones (v2 family
    // 0x21 or v1 TCP6) come back as plain IPv4, by design.
    if let Some((src, dst)) = h.addresses {
        let want = Some(normalize(src, dst));
        match h.version {
            Version::V2 => {
                let keep = tlvs_for_reemit(&h.tlvs);
                assert!(keep.len() <= V2_MAX_TLVS_LEN, "re-emit TLVs too long");
                let out = build_v2(src, dst, &keep);
                let back = parse(&out, Versions::V2).expect("re-built v2 header parses");
                assert_eq!(back.addresses, want, "v2 re-emit addresses");
                assert_eq!(back.tlvs, keep, "v2 re-emit TLVs");
                assert_eq!(back.len, out.len(), "v2 re-emit len");
            }
            Version::V1 => {
                let out = build_v1(src, dst);
                let back = parse(&out, Versions::V1).expect("re-built v1 header parses");
                assert_eq!(back.addresses, want, "v1 re-emit addresses");
                assert_eq!(back.len, out.len(), "v1 re-emit len");
            }
        }
    }
}
