//! Coverage-guided fuzzing of the WebSocket upgrade parser and rewriter
//! (`splicer_proto::http_upgrade`, the code splicer runs).
//!
//! The listener's readers (`splicer_proto::preamble`) are fed each input a
//! byte at a time too, requests and the broker's responses.
//!
//! `cargo +nightly fuzz run http_upgrade` from this directory; `cargo xtask
//! test` runs it for 30 s.
//!
//! Each input is tried twice: as a whole request head, and as header lines
//! spliced into a valid upgrade (random bytes rarely make a request line that
//! parses, so this is what gets `rewrite` exercised).
#![no_main]

use libfuzzer_sys::fuzz_target;
use splicer_fuzz::segmented;
use splicer_proto::preamble::{UpgradeRequest, UpgradeResponse};

use splicer_proto::http_upgrade::{
    parse_head, parse_head_limited, rewrite, Edit, Forwarding, Head, Refusal, MAX_HEADERS,
    X_FORWARDED_FOR, X_FORWARDED_PORT,
};

const MAX_HEAD: usize = 4096;
const REAL_IP: &str = "X-Real-IP";

/// A valid upgrade up to its header lines.
const TEMPLATE: &[u8] = b"GET /mqtt?client=fuzz HTTP/1.1\r\n\
    Host: broker.example\r\n\
    Upgrade: websocket\r\n\
    Connection: Upgrade\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n";

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut spliced = TEMPLATE.to_vec();
    spliced.extend_from_slice(data);
    spliced.extend_from_slice(b"\r\n\r\n");
    check(&spliced);
    for input in [data, &spliced] {
        segmented(|| UpgradeRequest::new(MAX_HEAD), input);
        segmented(|| UpgradeResponse::new(MAX_HEAD), input);
    }
});

fn check(data: &[u8]) {
    let head = match parse_head(data, MAX_HEAD) {
        Ok(Some(head)) => head,
        Ok(None) => {
            assert!(data.len() < MAX_HEAD, "incomplete at {} bytes", data.len());
            return;
        }
        Err(refusal) => {
            check_response(&refusal);
            return;
        }
    };
    assert!(
        head.len <= data.len() && head.len <= MAX_HEAD,
        "len {}",
        head.len
    );
    // The head alone parses the same: nothing after it was looked at.
    let bytes = &data[..head.len];
    assert_eq!(
        parse_head(bytes, MAX_HEAD),
        Ok(Some(head.clone())),
        "head alone"
    );

    let path = head
        .target
        .split('?')
        .next()
        .unwrap_or_default()
        .to_string();
    let verdict = head.check_websocket(None);
    assert_eq!(
        head.check_websocket(Some(&path)),
        verdict,
        "own path vs any path"
    );
    if let Err(refusal) = verdict {
        check_response(&refusal);
        return;
    }
    if path != "/elsewhere" {
        assert_eq!(
            head.check_websocket(Some("/elsewhere")),
            Err(Refusal::NotFound)
        );
    }

    let forwardings = [
        Forwarding {
            forwarded_for: Edit::Set("192.0.2.1".into()),
            forwarded_port: Edit::Set("8083".into()),
            set_header: None,
            remove: Vec::new(),
        },
        Forwarding {
            forwarded_for: Edit::Append("2001:db8::1".into()),
            forwarded_port: Edit::Append("443".into()),
            set_header: Some((REAL_IP.into(), "2001:db8::1".into())),
            remove: Vec::new(),
        },
    ];
    for f in &forwardings {
        let out = rewrite(bytes, &head, f);
        // rewrite adds up to three fields to a head that had up to MAX_HEADERS.
        let back = parse_head_limited(&out, usize::MAX, MAX_HEADERS + 3)
            .unwrap_or_else(|r| panic!("rewritten head refused: {r:?}"))
            .expect("rewritten head is complete");
        assert_eq!(back.len, out.len(), "rewritten len");
        assert_eq!(back.check_websocket(Some(&path)), Ok(()), "rewritten check");
        assert_eq!((&back.method, &back.target), (&head.method, &head.target));
        assert_eq!(back.version, head.version);

        let sets_real_ip = f.set_header.is_some();
        let forwarding = |name: &str| {
            name.eq_ignore_ascii_case(X_FORWARDED_FOR)
                || name.eq_ignore_ascii_case(X_FORWARDED_PORT)
                || (sets_real_ip && name.eq_ignore_ascii_case(REAL_IP))
        };
        let others = |h: &Head| -> Vec<(String, Vec<u8>)> {
            h.headers
                .iter()
                .filter(|(n, _)| !forwarding(n))
                .cloned()
                .collect()
        };
        assert_eq!(others(&back), others(&head), "non-forwarding headers");

        let mut want = vec![
            (
                X_FORWARDED_FOR.to_string(),
                expected(&head, X_FORWARDED_FOR, &f.forwarded_for),
            ),
            (
                X_FORWARDED_PORT.to_string(),
                expected(&head, X_FORWARDED_PORT, &f.forwarded_port),
            ),
        ];
        if let Some((name, value)) = &f.set_header {
            want.push((name.clone(), value.clone().into_bytes()));
        }
        let got: Vec<_> = back
            .headers
            .iter()
            .filter(|(n, _)| forwarding(n))
            .cloned()
            .collect();
        assert_eq!(got, want, "forwarding headers");
    }
}

/// The value `edit` should give field `name`, worked out here independently
/// of the module's own list handling.
fn expected(head: &Head, name: &str, edit: &Edit) -> Vec<u8> {
    let value = match edit {
        Edit::Set(v) => return v.clone().into_bytes(),
        Edit::Append(v) => v.as_bytes(),
    };
    let mut list: Vec<&[u8]> = Vec::new();
    for (n, v) in &head.headers {
        if n.eq_ignore_ascii_case(name) {
            for element in v.split(|&b| b == b',') {
                let element = element.trim_ascii();
                // trim_ascii also takes CR/LF/FF, which a value cannot hold.
                if !element.is_empty() {
                    list.push(element);
                }
            }
        }
    }
    list.push(value);
    list.join(&b", "[..])
}

/// A refusal's response is a complete HTTP response with its status and a
/// Content-Length that matches the body.
fn check_response(refusal: &Refusal) {
    let bytes = refusal.response();
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut response = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(n)) = response.parse(&bytes) else {
        panic!("{refusal:?}: incomplete response");
    };
    assert_eq!(response.code, Some(refusal.status()));
    let length = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| h.value);
    assert_eq!(length, Some((bytes.len() - n).to_string().as_bytes()));
}
