//! The HTTP/1.1 upgrade request that opens an MQTT-over-WebSocket connection,
//! with no I/O: parsed with `httparse`, checked as an RFC 6455 (4.2.1)
//! handshake on the listener's path, and re-emitted for the broker with
//! X-Forwarded-For, X-Forwarded-Port and an optional real-IP header rewritten.
//! Every other byte of the head goes to the broker as received.
//!
//! What is refused, and how:
//! - a malformed head (anything `httparse` rejects with its strict defaults,
//!   including obs-fold continuation lines and whitespace before a colon),
//!   or one with a bare LF or CR line ending: 400;
//! - a head longer than the caller's limit, or with more than
//!   [`MAX_HEADERS`] fields: 431;
//! - the rest is [`Head::check_websocket`]'s business (404, 426, 400).
//!
//! Leading empty lines before the request line (RFC 9112 2.2) are accepted
//! and not forwarded.


/// Most header fields accepted in a request head; one more is answered with
/// 431 (Request Header Fields Too Large), like a head over the byte limit.
/// [`rewrite`] adds at most three, so its output always parses with
/// [`parse_head_limited`] at `MAX_HEADERS + 3`.
pub const MAX_HEADERS: usize = 128;
/// Names of the fields [`rewrite`] adds, spelt as it emits them.
pub const X_FORWARDED_FOR: &str = "X-Forwarded-For";
pub const X_FORWARDED_PORT: &str = "X-Forwarded-Port";
/// The only `Sec-WebSocket-Version` accepted (RFC 6455 4.1).
pub const WEBSOCKET_VERSION: &str = "13";

/// Why a request is refused; each maps to an HTTP status and a complete
/// response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 400: malformed, or a WebSocket upgrade missing Sec-WebSocket-Key /
    /// wrong version / not GET / not HTTP/1.1 / not exactly one Host.
    BadRequest(String),
    /// 404: path is not the WebSocket path.
    NotFound,
    /// 426: a well-formed request that is not a WebSocket upgrade (no
    /// `Upgrade: websocket` / `Connection: upgrade`).
    UpgradeRequired,
    /// 431: head larger than the limit, or more than [`MAX_HEADERS`] fields.
    TooLarge,
    /// 408: head not complete in time (the caller decides this; only the
    /// response is built here).
    Timeout,
    /// 403: the real client is not allowed (allow/deny; the caller decides).
    Forbidden,
    /// 502: no upstream accepted a connection (the caller decides).
    BadGateway,
    /// 429: over a rate limit (the caller decides).
    TooManyRequests,
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::BadRequest(_) => 400,
            Refusal::NotFound => 404,
            Refusal::Timeout => 408,
            Refusal::UpgradeRequired => 426,
            Refusal::TooLarge => 431,
            Refusal::Forbidden => 403,
            Refusal::BadGateway => 502,
            Refusal::TooManyRequests => 429,
        }
    }

    /// The reason phrase of [`Refusal::status`].
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::BadRequest(_) => "Bad Request",
            Refusal::NotFound => "Not Found",
            Refusal::Timeout => "Request Timeout",
            Refusal::UpgradeRequired => "Upgrade Required",
            Refusal::TooLarge => "Request Header Fields Too Large",
            Refusal::Forbidden => "Forbidden",
            Refusal::BadGateway => "Bad Gateway",
            Refusal::TooManyRequests => "Too Many Requests",
        }
    }

    /// A complete HTTP/1.1 response: status line, `Connection: close`,
    /// `Content-Type: text/plain`, `Content-Length`, and a one-line body
    /// saying why. 426 and 400 also carry `Sec-WebSocket-Version: 13` (the
    /// version this side speaks, RFC 6455 4.4), and 426 `Upgrade: websocket`.
    pub fn response(&self) -> Vec<u8> {
        let why = match self {
            // Only this module's own messages get here, but keep the body one
            // line of printable ASCII whatever a caller puts in.
            Refusal::BadRequest(m) => {
                let m: String = m
                    .chars()
                    .filter(|c| c.is_ascii() && !c.is_ascii_control())
                    .take(200)
                    .collect();
                format!("Bad request: {m}.")
            }
            Refusal::NotFound => "No WebSocket endpoint at this path.".to_string(),
            Refusal::Timeout => "The request head did not arrive in time.".to_string(),
            Refusal::UpgradeRequired => {
                "This endpoint takes only WebSocket upgrade requests.".to_string()
            }
            Refusal::TooLarge => "The request head is too large.".to_string(),
            Refusal::Forbidden => "Your address may not use this endpoint.".to_string(),
            Refusal::BadGateway => "No broker is available.".to_string(),
            Refusal::TooManyRequests => "Too many new connections; try again later.".to_string(),
        };
        let body = format!("{why}\n");
        let mut extra = String::new();
        if let Refusal::UpgradeRequired = self {
            extra.push_str("Upgrade: websocket\r\n");
        }
        if let Refusal::UpgradeRequired | Refusal::BadRequest(_) = self {
            extra.push_str("Sec-WebSocket-Version: 13\r\n");
        }
        format!(
            "HTTP/1.1 {} {}\r\nConnection: close\r\n{extra}Content-Type: text/plain\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.status(),
            self.reason(),
            body.len(),
        )
        .into_bytes()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Bytes of the request head including the blank line; the body/frames
    /// start at buf[len..].
    pub len: usize,
    pub method: String,
    /// The request target as sent (path plus query).
    pub target: String,
    /// The HTTP minor version: 1 for HTTP/1.1, 0 for HTTP/1.0 (`httparse`
    /// accepts nothing else).
    pub version: u8,
    /// Every header field in order: (name as sent, value bytes). Values are
    /// as `httparse` gives them: without the whitespace around them.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Parses a request head from the start of `buf`, which may hold more bytes
/// after it (early WebSocket frames). Ok(None): incomplete so far (caller
/// reads more, unless buf is already at `max_head` bytes: then
/// Err(TooLarge)). A head is at most `max_head` bytes, blank line included.
pub fn parse_head(buf: &[u8], max_head: usize) -> Result<Option<Head>, Refusal> {
    parse_head_limited(buf, max_head, MAX_HEADERS)
}

/// [`parse_head`] with a field count limit other than [`MAX_HEADERS`].
pub fn parse_head_limited(
    buf: &[u8],
    max_head: usize,
    max_headers: usize,
) -> Result<Option<Head>, Refusal> {
    // Bytes past the limit are never looked at: a head that ends there is
    // too large anyway.
    let window = &buf[..buf.len().min(max_head)];
    let mut slots = vec![httparse::EMPTY_HEADER; max_headers];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= max_head => return Err(Refusal::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TooLarge),
        Err(e) => return Err(Refusal::BadRequest(format!("malformed request head ({e})"))),
    };
    // httparse takes a bare LF as a line ending; the broker might not, and
    // rewrite() splits lines on CRLF. (A bare CR it already rejects.)
    let raw = &window[..len];
    for (i, &b) in raw.iter().enumerate() {
        let bare_lf = b == b'\n' && (i == 0 || raw[i - 1] != b'\r');
        let bare_cr = b == b'\r' && raw.get(i + 1) != Some(&b'\n');
        if bare_lf || bare_cr {
            return Err(Refusal::BadRequest(
                "line not ended by CRLF in request head".to_string(),
            ));
        }
    }
    // A complete parse fills all three.
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(Refusal::BadRequest("incomplete request line".to_string()));
    };
    Ok(Some(Head {
        len,
        method: method.to_string(),
        target: target.to_string(),
        version,
        headers: req
            .headers
            .iter()
            .map(|h| (h.name.to_string(), h.value.to_vec()))
            .collect(),
    }))
}

impl Head {
    /// The WebSocket checks, in this order: path (`ws_path` None = any path;
    /// else the target's path part, before `?`, must equal it exactly) -> 404;
    /// not an upgrade to websocket (Upgrade header lacks token "websocket"
    /// case-insensitively, or Connection lacks token "upgrade") -> 426;
    /// method not GET, not HTTP/1.1, not exactly one Host field (RFC 9112
    /// 3.2), Sec-WebSocket-Key missing, repeated or not base64 of 16 bytes,
    /// or Sec-WebSocket-Version not 13 -> 400.
    pub fn check_websocket(&self, ws_path: Option<&str>) -> Result<(), Refusal> {
        if let Some(want) = ws_path {
            let path = self.target.split('?').next().unwrap_or_default();
            if path != want {
                return Err(Refusal::NotFound);
            }
        }
        if !self.has_token("upgrade", "websocket") || !self.has_token("connection", "upgrade") {
            return Err(Refusal::UpgradeRequired);
        }
        let bad = |why: &str| Err(Refusal::BadRequest(why.to_string()));
        // Only WebSocket: a broker that took `h2c` instead would read every
        // later request on the connection, unrewritten, as HTTP/2.
        if self.list_bytes("upgrade").len() != 1 || self.fields("http2-settings").next().is_some() {
            return bad("an upgrade to anything but websocket alone");
        }
        // Any other Connection option names a header field that the next
        // hop must then strip (hop-by-hop, RFC 9110 7.6.1): one of those
        // splicer wrote, or the one a broker reads the client from, whatever
        // its configured name. Browsers send `Upgrade` and `keep-alive`.
        if self.list_bytes("connection").iter().any(|t| {
            !["upgrade", "keep-alive", "close"]
                .iter()
                .any(|n| t.eq_ignore_ascii_case(n.as_bytes()))
        }) {
            return bad("Connection names a header field (only Upgrade, keep-alive and close are taken)");
        }
        if self.method != "GET" {
            return bad("a WebSocket upgrade must be a GET");
        }
        if self.version != 1 {
            return bad("a WebSocket upgrade must be HTTP/1.1");
        }
        if self.fields("host").count() != 1 {
            return bad("an HTTP/1.1 request needs exactly one Host field");
        }
        let mut keys = self.fields("sec-websocket-key");
        match (keys.next(), keys.next()) {
            (Some(key), None) if is_websocket_key(key) => {}
            _ => return bad("missing or invalid Sec-WebSocket-Key"),
        }
        match self.list_bytes("sec-websocket-version").as_slice() {
            [v] if *v == WEBSOCKET_VERSION.as_bytes() => {}
            // RFC 6455 4.2.2: a version we do not speak gets 426 naming ours.
            [_] => return Err(Refusal::UpgradeRequired),
            _ => return bad("missing or repeated Sec-WebSocket-Version"),
        }
        // Whatever follows the head is WebSocket frames. A body would let
        // a request hide in it that the broker may read as its next one.
        if self.fields("content-length").next().is_some()
            || self.fields("transfer-encoding").next().is_some()
        {
            return bad("a WebSocket upgrade has no body (Content-Length or Transfer-Encoding)");
        }
        Ok(())
    }

    /// All values of the fields named `name` (case-insensitive) combined as
    /// one comma-separated list (RFC 9110 5.3), split on commas, each element
    /// trimmed of spaces/tabs, empty elements dropped. Bytes that are not
    /// UTF-8 become U+FFFD; [`Head::list_bytes`] keeps them.
    pub fn list(&self, name: &str) -> Vec<String> {
        self.list_bytes(name)
            .into_iter()
            .map(|e| String::from_utf8_lossy(e).into_owned())
            .collect()
    }

    /// [`Head::list`] as the bytes received.
    pub fn list_bytes(&self, name: &str) -> Vec<&[u8]> {
        list_elements(self.fields(name)).collect()
    }

    /// The values of the fields named `name` (case-insensitive), in order.
    pub fn fields<'a, 'n>(&'a self, name: &'n str) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n> {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Whether the list [`Head::list_bytes`] of `name` holds `token`,
    /// case-insensitively.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.list_bytes(name)
            .iter()
            .any(|e| e.eq_ignore_ascii_case(token.as_bytes()))
    }
}

/// The status line and fields of the broker's answer to an upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    /// Bytes of the head, blank line included.
    pub len: usize,
    /// The body's length, when the response says (a refusal's body goes
    /// to the client with it).
    pub content_length: Option<usize>,
    /// Whether it names `websocket` in its Upgrade field: a 101 to anything
    /// else is not spliced.
    pub to_websocket: bool,
}

/// Parses a response head from the start of `buf`. Ok(None): incomplete.
/// Err: not an HTTP/1.1 response, or a Content-Length that is not one
/// number.
pub fn parse_response_head(buf: &[u8]) -> Result<Option<ResponseHead>, String> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed response head ({e})")),
    };
    let (Some(status), Some(1)) = (resp.code, resp.version) else {
        return Err("not an HTTP/1.1 response".into());
    };
    let mut lengths = resp
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse::<usize>().ok()));
    let content_length = match (lengths.next(), lengths.next()) {
        (None, _) => None,
        (Some(Some(n)), None) => Some(n),
        _ => return Err("bad or repeated Content-Length".into()),
    };
    let upgrade = resp
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("upgrade"))
        .map(|h| h.value);
    let to_websocket = list_elements(upgrade).any(|t| t.eq_ignore_ascii_case(b"websocket"));
    Ok(Some(ResponseHead {
        status,
        len,
        content_length,
        to_websocket,
    }))
}

/// How to set one forwarding header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// Replace every field of that name with one field of this value (nginx
    /// `proxy_set_header X-Forwarded-For $remote_addr`).
    Set(String),
    /// Keep what came in (all fields combined into one list) and append this
    /// value: `X-Forwarded-For: a, b, <value>` (nginx
    /// `$proxy_add_x_forwarded_for`); if nothing came in, just the value.
    Append(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarding {
    /// X-Forwarded-For
    pub forwarded_for: Edit,
    /// X-Forwarded-Port
    pub forwarded_port: Edit,
    /// Optional extra header to set, e.g. ("X-Real-IP", "1.2.3.4"): replaces
    /// any field of that name. Ignored if the name is not an HTTP token or is
    /// X-Forwarded-For / X-Forwarded-Port (the edits above govern those). It
    /// should not name a field of the handshake itself (Host, Upgrade, ...).
    pub set_header: Option<(String, String)>,
    /// Fields to drop without replacement, e.g. an untrusted client's own
    /// X-Real-IP when no real-IP header is set. Same name rules as above.
    pub remove: Vec<String>,
}

/// The rewritten head: the request line and every header line exactly as
/// received (same bytes, same order, even odd spacing/case), except the
/// fields named X-Forwarded-For, X-Forwarded-Port and (if set) `set_header`'s
/// name, which are removed wherever they were; the new fields are then added
/// just before the final CRLF in this order: X-Forwarded-For,
/// X-Forwarded-Port, set_header. `head_bytes` is `&buf[..head.len]` from
/// parse_head (bytes after its blank line are not copied).
///
/// Values from `f` lose their control characters (CR and LF included: no
/// header injection) and surrounding spaces/tabs. A field whose value ends up
/// empty (an empty `Set`, an empty `Append` with nothing incoming) is not
/// added, but the incoming fields of that name are still removed.
pub fn rewrite(head_bytes: &[u8], head: &Head, f: &Forwarding) -> Vec<u8> {
    let set_header = f.set_header.as_ref().and_then(|(name, value)| {
        let usable = is_token(name)
            && !name.eq_ignore_ascii_case(X_FORWARDED_FOR)
            && !name.eq_ignore_ascii_case(X_FORWARDED_PORT);
        usable.then(|| (name.as_bytes(), clean(value)))
    });
    let set_name = set_header.as_ref().map(|(name, _)| *name);
    let added = [
        (
            X_FORWARDED_FOR.as_bytes(),
            edited(head, X_FORWARDED_FOR, &f.forwarded_for),
        ),
        (
            X_FORWARDED_PORT.as_bytes(),
            edited(head, X_FORWARDED_PORT, &f.forwarded_port),
        ),
    ]
    .into_iter()
    .chain(set_header);

    // A name is compared with `_` read as `-`: some servers (and the
    // frameworks behind them) take X_Forwarded_For for X-Forwarded-For.
    let same = |name: &[u8], want: &[u8]| {
        name.len() == want.len()
            && name.iter().zip(want).all(|(&a, &b)| {
                let a = if a == b'_' { b'-' } else { a };
                a.eq_ignore_ascii_case(&b)
            })
    };
    let replaced = |name: &[u8]| {
        same(name, X_FORWARDED_FOR.as_bytes())
            || same(name, X_FORWARDED_PORT.as_bytes())
            || set_name.is_some_and(|n| same(name, n))
            || f.remove
                .iter()
                .any(|r| is_token(r) && same(name, r.as_bytes()))
    };

    let mut out = Vec::with_capacity(head_bytes.len() + 128);
    let mut rest = head_bytes;
    // Empty lines before the request line, which httparse skipped.
    while let Some(after) = rest.strip_prefix(b"\r\n") {
        rest = after;
    }
    let mut request_line = true;
    while let Some(end) = find_crlf(rest) {
        let line = &rest[..end];
        rest = &rest[end + 2..];
        if request_line {
            request_line = false;
        } else if line.is_empty() {
            break;
        } else {
            // httparse allows no whitespace before the colon; trim anyway.
            let name = line.split(|&b| b == b':').next().unwrap_or_default();
            if replaced(trim(name)) {
                continue;
            }
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in added {
        if !value.is_empty() {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(&value);
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The value `edit` gives the field `name`.
fn edited(head: &Head, name: &str, edit: &Edit) -> Vec<u8> {
    match edit {
        Edit::Set(value) => clean(value),
        Edit::Append(value) => {
            let value = clean(value);
            let mut list = head.list_bytes(name);
            if !value.is_empty() {
                list.push(&value);
            }
            list.join(&b", "[..])
        }
    }
}

/// `value` without control characters (tab aside) and without spaces/tabs
/// at either end: always a valid field value, never a line break.
fn clean(value: &str) -> Vec<u8> {
    let kept: Vec<u8> = value
        .bytes()
        .filter(|&b| b == b'\t' || !(b < 0x20 || b == 0x7f))
        .collect();
    trim(&kept).to_vec()
}

/// The elements of the comma-separated lists in `values`, taken as one list
/// (RFC 9110 5.3), each trimmed of spaces and tabs, empty ones dropped.
fn list_elements<'a>(values: impl Iterator<Item = &'a [u8]>) -> impl Iterator<Item = &'a [u8]> {
    values
        .flat_map(|v| v.split(|&b| b == b','))
        .map(trim)
        .filter(|e| !e.is_empty())
}

fn trim(s: &[u8]) -> &[u8] {
    let ws = |b: &u8| *b == b' ' || *b == b'\t';
    let start = s.iter().position(|b| !ws(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !ws(b)).map_or(start, |i| i + 1);
    &s[start..end]
}

fn find_crlf(s: &[u8]) -> Option<usize> {
    s.windows(2).position(|w| w == b"\r\n")
}

/// An HTTP token (RFC 9110 5.6.2), as a field name must be.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Base64 of 16 bytes (RFC 6455 4.1): 22 characters and "==".
fn is_websocket_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 8192;

    /// What the `ws` package (MQTT.js's WebSocket client) sends.
    const MQTTJS: &[u8] = b"GET /mqtt HTTP/1.1\r\n\
        Sec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Connection: Upgrade\r\n\
        Upgrade: websocket\r\n\
        Sec-WebSocket-Protocol: mqtt\r\n\
        Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
        Host: broker.example:8083\r\n\
        \r\n";

    fn head(buf: &[u8]) -> Head {
        parse_head(buf, MAX).expect("parses").expect("complete")
    }

    fn set(a: &str) -> Edit {
        Edit::Set(a.to_string())
    }

    fn append(a: &str) -> Edit {
        Edit::Append(a.to_string())
    }

    fn fwd(xff: Edit, xfp: Edit, real: Option<&str>) -> Forwarding {
        Forwarding {
            forwarded_for: xff,
            forwarded_port: xfp,
            set_header: real.map(|ip| ("X-Real-IP".to_string(), ip.to_string())),
            remove: Vec::new(),
        }
    }

    /// parse_head, then rewrite of the parsed head.
    fn rewritten(buf: &[u8], f: &Forwarding) -> Vec<u8> {
        let h = head(buf);
        rewrite(&buf[..h.len], &h, f)
    }

    /// Request with these header lines added to a minimal valid upgrade.
    fn upgrade_with(extra: &str) -> Vec<u8> {
        format!(
            "GET /mqtt HTTP/1.1\r\nHost: b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             {extra}\r\n"
        )
        .into_bytes()
    }

    fn values(h: &Head, name: &str) -> Vec<String> {
        h.fields(name)
            .map(|v| String::from_utf8(v.to_vec()).unwrap())
            .collect()
    }

    fn show(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    #[test]
    fn mqttjs_upgrade_parses_and_passes() {
        let h = head(MQTTJS);
        assert_eq!(h.len, MQTTJS.len());
        assert_eq!(h.method, "GET");
        assert_eq!(h.target, "/mqtt");
        assert_eq!(h.version, 1);
        assert_eq!(h.headers.len(), 7);
        assert_eq!(
            h.headers[0],
            ("Sec-WebSocket-Version".to_string(), b"13".to_vec())
        );
        assert_eq!(
            h.list("sec-websocket-extensions"),
            ["permessage-deflate; client_max_window_bits"]
        );
        assert_eq!(h.check_websocket(Some("/mqtt")), Ok(()));
        assert_eq!(h.check_websocket(None), Ok(()));
    }

    #[test]
    fn mqttjs_upgrade_rewritten_with_set() {
        let out = rewritten(
            MQTTJS,
            &fwd(set("203.0.113.7"), set("8083"), Some("203.0.113.7")),
        );
        let want: &[u8] = b"GET /mqtt HTTP/1.1\r\n\
            Sec-WebSocket-Version: 13\r\n\
            Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
            Connection: Upgrade\r\n\
            Upgrade: websocket\r\n\
            Sec-WebSocket-Protocol: mqtt\r\n\
            Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
            Host: broker.example:8083\r\n\
            X-Forwarded-For: 203.0.113.7\r\n\
            X-Forwarded-Port: 8083\r\n\
            X-Real-IP: 203.0.113.7\r\n\
            \r\n";
        assert_eq!(show(&out), show(want));
    }

    /// Odd spacing and case, a browser-style `connection: keep-alive,
    /// Upgrade`, and forwarding fields from a proxy in front: all lines kept
    /// byte for byte except the forwarding ones, which move to the end.
    #[test]
    fn odd_upgrade_rewritten_with_append() {
        let req: &[u8] = b"GET /mqtt?client=web HTTP/1.1\r\n\
            Host: broker.example\r\n\
            x-forwarded-for: 198.51.100.1,192.0.2.9\r\n\
            User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n\
            upgrade: WebSocket\r\n\
            connection: keep-alive, Upgrade\r\n\
            Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n\
            sec-websocket-version:13\r\n\
            Sec-WebSocket-Protocol: mqtt\r\n\
            x-custom:  spaced value \r\n\
            X-Forwarded-Port: 443\r\n\
            X-EMPTY:\r\n\
            \r\n";
        let h = head(req);
        assert_eq!(h.check_websocket(Some("/mqtt")), Ok(()));
        assert_eq!(values(&h, "x-custom"), ["spaced value"]);
        assert_eq!(values(&h, "x-empty"), [""]);
        let out = rewrite(req, &h, &fwd(append("203.0.113.7"), append("8083"), None));
        let want: &[u8] = b"GET /mqtt?client=web HTTP/1.1\r\n\
            Host: broker.example\r\n\
            User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n\
            upgrade: WebSocket\r\n\
            connection: keep-alive, Upgrade\r\n\
            Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n\
            sec-websocket-version:13\r\n\
            Sec-WebSocket-Protocol: mqtt\r\n\
            x-custom:  spaced value \r\n\
            X-EMPTY:\r\n\
            X-Forwarded-For: 198.51.100.1, 192.0.2.9, 203.0.113.7\r\n\
            X-Forwarded-Port: 443, 8083\r\n\
            \r\n";
        assert_eq!(show(&out), show(want));
        let back = head(&out);
        assert_eq!(back.check_websocket(Some("/mqtt")), Ok(()));
        assert_eq!(back.len, out.len());
    }

    #[test]
    fn several_forwarded_for_fields_combine_in_order() {
        let req = upgrade_with("X-Forwarded-For: a\r\nX-Custom: 1\r\nx-forwarded-for: b, c\r\n");
        let h = head(&req);
        assert_eq!(h.list("X-FORWARDED-FOR"), ["a", "b", "c"]);
        let out = rewrite(&req, &h, &fwd(append("d"), set("1883"), None));
        let back = head(&out);
        assert_eq!(values(&back, "x-forwarded-for"), ["a, b, c, d"]);
        assert_eq!(values(&back, "x-forwarded-port"), ["1883"]);
        assert!(show(&out).ends_with(
            "X-Custom: 1\r\nX-Forwarded-For: a, b, c, d\r\nX-Forwarded-Port: 1883\r\n\r\n"
        ));
    }

    #[test]
    fn several_forwarded_port_fields_combine_in_order() {
        let req =
            upgrade_with("X-Forwarded-Port: 443\r\nX-Custom: 1\r\nX-FORWARDED-PORT: 8443,, 80\r\n");
        let out = rewritten(&req, &fwd(append("192.0.2.1"), append("8083"), None));
        let back = head(&out);
        assert_eq!(values(&back, "x-forwarded-port"), ["443, 8443, 80, 8083"]);
        assert_eq!(values(&back, "x-forwarded-for"), ["192.0.2.1"]);
        assert!(show(&out).ends_with(
            "X-Custom: 1\r\nX-Forwarded-For: 192.0.2.1\r\nX-Forwarded-Port: 443, 8443, 80, 8083\r\n\r\n"
        ));
    }

    #[test]
    fn append_with_nothing_incoming_is_just_the_value() {
        let out = rewritten(MQTTJS, &fwd(append("2001:db8::1"), append("443"), None));
        assert!(show(&out).ends_with(
            "Host: broker.example:8083\r\nX-Forwarded-For: 2001:db8::1\r\nX-Forwarded-Port: 443\r\n\r\n"
        ));
    }

    #[test]
    fn remove_drops_a_field_without_replacement() {
        let req = b"GET /mqtt HTTP/1.1\r\nHost: b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nx-real-ip: 6.6.6.6\r\nX-Other: 1\r\n\r\n";
        let head = parse_head(req, 4096).unwrap().unwrap();
        let f = Forwarding {
            forwarded_for: Edit::Set("10.0.0.1".into()),
            forwarded_port: Edit::Set("1".into()),
            set_header: None,
            remove: vec!["X-Real-IP".into()],
        };
        let out = rewrite(&req[..head.len], &head, &f);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.to_ascii_lowercase().contains("x-real-ip"), "{text}");
        assert!(text.contains("X-Other: 1\r\n"), "{text}");
    }

    #[test]
    fn set_header_replaces_existing_real_ip() {
        let req = upgrade_with("X-Real-IP: 10.9.9.9\r\nX-Custom: 1\r\nx-real-ip: 10.8.8.8\r\n");
        let out = rewritten(&req, &fwd(set("192.0.2.1"), set("443"), Some("192.0.2.1")));
        let back = head(&out);
        assert_eq!(values(&back, "x-real-ip"), ["192.0.2.1"]);
        assert!(!show(&out).contains("10.9.9.9") && !show(&out).contains("10.8.8.8"));
        assert!(show(&out).ends_with("X-Custom: 1\r\nX-Forwarded-For: 192.0.2.1\r\nX-Forwarded-Port: 443\r\nX-Real-IP: 192.0.2.1\r\n\r\n"));
        // Without set_header, X-Real-IP is an ordinary field and stays.
        let out = rewritten(&req, &fwd(set("192.0.2.1"), set("443"), None));
        assert_eq!(values(&head(&out), "x-real-ip"), ["10.9.9.9", "10.8.8.8"]);
    }

    #[test]
    fn forged_forwarded_for_disappears_with_set() {
        let req = upgrade_with("X-Forwarded-For: 127.0.0.1\r\n");
        let out = rewritten(&req, &fwd(set("198.51.100.4"), set("1883"), None));
        assert!(!show(&out).contains("127.0.0.1"), "{}", show(&out));
        assert_eq!(values(&head(&out), "x-forwarded-for"), ["198.51.100.4"]);
    }

    #[test]
    fn early_frames_after_the_head_are_untouched() {
        // A masked WebSocket binary frame carrying an MQTT CONNECT, sent
        // before the 101 came back.
        let frame: &[u8] = &[
            0x82, 0x8e, 1, 2, 3, 4, 0x11, 0x0e, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 0,
        ];
        let mut buf = MQTTJS.to_vec();
        buf.extend_from_slice(frame);
        let h = head(&buf);
        assert_eq!(h.len, MQTTJS.len());
        assert_eq!(&buf[h.len..], frame);
        // Same head as without the frame.
        assert_eq!(Some(h.clone()), parse_head(MQTTJS, MAX).unwrap());
        let out = rewrite(&buf[..h.len], &h, &fwd(set("192.0.2.1"), set("1"), None));
        assert!(out.ends_with(b"X-Forwarded-Port: 1\r\n\r\n"));
        // A CRLFCRLF inside the frame is not mistaken for anything.
        let mut buf2 = MQTTJS.to_vec();
        buf2.extend_from_slice(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        assert_eq!(head(&buf2).len, MQTTJS.len());
    }

    #[test]
    fn refusal_statuses_and_responses() {
        let cases = [
            (
                Refusal::BadRequest("a WebSocket upgrade must be a GET".into()),
                400,
                "Bad Request",
            ),
            (Refusal::NotFound, 404, "Not Found"),
            (Refusal::Timeout, 408, "Request Timeout"),
            (Refusal::UpgradeRequired, 426, "Upgrade Required"),
            (Refusal::TooLarge, 431, "Request Header Fields Too Large"),
            (Refusal::Forbidden, 403, "Forbidden"),
            (Refusal::BadGateway, 502, "Bad Gateway"),
        ];
        for (r, status, reason) in cases {
            assert_eq!(r.status(), status);
            let bytes = r.response();
            let mut hs = [httparse::EMPTY_HEADER; 16];
            let mut resp = httparse::Response::new(&mut hs);
            let Ok(httparse::Status::Complete(n)) = resp.parse(&bytes) else {
                panic!("{status}: not a complete response: {}", show(&bytes));
            };
            assert_eq!(resp.version, Some(1));
            assert_eq!(resp.code, Some(status));
            assert_eq!(resp.reason, Some(reason));
            let get = |name: &str| {
                let v: Vec<&str> = resp
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| std::str::from_utf8(h.value).unwrap())
                    .collect();
                v
            };
            assert_eq!(get("connection"), ["close"]);
            assert_eq!(get("content-type"), ["text/plain"]);
            let body = &bytes[n..];
            assert_eq!(get("content-length"), [body.len().to_string()]);
            assert!(body.ends_with(b"\n") && body.iter().filter(|&&b| b == b'\n').count() == 1);
            assert!(body.len() > 10);
            if status == 426 {
                assert_eq!(get("upgrade"), ["websocket"]);
                assert_eq!(get("sec-websocket-version"), ["13"]);
            } else if status == 400 {
                assert_eq!(get("sec-websocket-version"), ["13"]);
                assert!(show(body).contains("must be a GET"));
            } else {
                assert!(get("upgrade").is_empty() && get("sec-websocket-version").is_empty());
            }
        }
        // A caller's message cannot break the body's single line.
        let body = Refusal::BadRequest("x\r\n\r\nHTTP/1.1 200 OK".into()).response();
        assert!(show(&body).ends_with("\r\n\r\nBad request: xHTTP/1.1 200 OK.\n"));
    }

    #[test]
    fn check_websocket_refusals_in_order() {
        let ok = upgrade_with("");
        assert_eq!(head(&ok).check_websocket(Some("/mqtt")), Ok(()));
        let check = |req: &[u8], path: Option<&str>| head(req).check_websocket(path);
        let bad = |r: Result<(), Refusal>| matches!(r, Err(Refusal::BadRequest(_)));

        // Path: exact, query ignored, None = any.
        assert_eq!(check(&ok, Some("/")), Err(Refusal::NotFound));
        assert_eq!(check(&ok, Some("/mqt")), Err(Refusal::NotFound));
        assert_eq!(check(&ok, Some("/mqtt/")), Err(Refusal::NotFound));
        assert_eq!(check(&ok, Some("/MQTT")), Err(Refusal::NotFound));
        let q = show(&ok).replace("GET /mqtt ", "GET /mqtt?x=/y ");
        assert_eq!(check(q.as_bytes(), Some("/mqtt")), Ok(()));
        assert_eq!(check(q.as_bytes(), None), Ok(()));
        let root = show(&ok).replace("GET /mqtt ", "GET / ");
        assert_eq!(
            check(root.as_bytes(), Some("/mqtt")),
            Err(Refusal::NotFound)
        );
        assert_eq!(check(root.as_bytes(), Some("/")), Ok(()));
        assert_eq!(check(root.as_bytes(), None), Ok(()));

        // Not an upgrade to websocket: 426, but a wrong path comes first.
        let plain = b"GET /mqtt HTTP/1.1\r\nHost: b\r\n\r\n";
        assert_eq!(check(plain, Some("/mqtt")), Err(Refusal::UpgradeRequired));
        assert_eq!(check(plain, Some("/other")), Err(Refusal::NotFound));
        let h2c = show(&ok).replace("Upgrade: websocket", "Upgrade: h2c");
        assert_eq!(check(h2c.as_bytes(), None), Err(Refusal::UpgradeRequired));
        // websocket alone: with h2c beside it a broker could pick h2c.
        let two = show(&ok).replace("Upgrade: websocket", "Upgrade: h2c, WEBSOCKET");
        assert!(bad(check(two.as_bytes(), None)));
        let settings = show(&ok).replace("Upgrade: websocket", "Upgrade: websocket\r\nHTTP2-Settings: AAMAAABkAAQAAP__");
        assert!(bad(check(settings.as_bytes(), None)));
        let case = show(&ok).replace("Upgrade: websocket", "Upgrade: WebSocket");
        assert_eq!(check(case.as_bytes(), None), Ok(()));
        // Hop-by-hop: a Connection token naming a header field, forwarding
        // or any other (the broker may read the client from any name).
        for tokens in ["Upgrade, X-Forwarded-For", "upgrade, x-real-ip", "Upgrade,Forwarded", "Upgrade, X-Client-IP"] {
            let hop = show(&ok).replace("Connection: Upgrade", &format!("Connection: {tokens}"));
            assert!(bad(check(hop.as_bytes(), None)), "{tokens}");
        }
        let no_conn = show(&ok).replace("Connection: Upgrade", "Connection: keep-alive");
        assert_eq!(
            check(no_conn.as_bytes(), None),
            Err(Refusal::UpgradeRequired)
        );
        let substr = show(&ok).replace("Connection: Upgrade", "Connection: upgraded");
        assert_eq!(
            check(substr.as_bytes(), None),
            Err(Refusal::UpgradeRequired)
        );
        let split = show(&ok).replace(
            "Connection: Upgrade",
            "Connection: close\r\nConnection: upgrade",
        );
        assert_eq!(check(split.as_bytes(), None), Ok(()));
        // A POST that is not an upgrade at all: 426 before 400.
        let post = b"POST /mqtt HTTP/1.1\r\nHost: b\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(check(post, None), Err(Refusal::UpgradeRequired));

        // Upgrades that are wrong: 400.
        let s = show(&ok);
        assert!(bad(check(s.replace("GET ", "POST ").as_bytes(), None)));
        assert!(bad(check(s.replace("GET ", "get ").as_bytes(), None)));
        assert!(bad(check(
            s.replace("HTTP/1.1", "HTTP/1.0").as_bytes(),
            None
        )));
        assert!(bad(check(s.replace("Host: b\r\n", "").as_bytes(), None)));
        assert!(bad(check(
            s.replace("Host: b\r\n", "Host: b\r\nHost: c\r\n")
                .as_bytes(),
            None
        )));
        let no_key = s.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "");
        assert!(bad(check(no_key.as_bytes(), None)));
        for key in [
            "",
            "abc",
            "dGhlIHNhbXBsZSBub25jZQ=",
            "dGhlIHNhbXBsZSBub25jZ===",
            "dGhlIHNhbXBsZSBub25jZQ==x",
            "dGhlIHNhbXBsZSBub25j*Q==",
        ] {
            let r = s.replace("dGhlIHNhbXBsZSBub25jZQ==", key);
            assert!(bad(check(r.as_bytes(), None)), "key {key:?}");
        }
        let two_keys = s.replace(
            "Sec-WebSocket-Version",
            "Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\nSec-WebSocket-Version",
        );
        assert!(bad(check(two_keys.as_bytes(), None)));
        // A single version we do not speak: 426 (RFC 6455 4.2.2); none or
        // several: malformed.
        for version in ["8", "130"] {
            let r = s.replace(
                "Sec-WebSocket-Version: 13",
                &format!("Sec-WebSocket-Version: {version}"),
            );
            assert_eq!(
                check(r.as_bytes(), None),
                Err(Refusal::UpgradeRequired),
                "version {version:?}"
            );
        }
        for version in ["", "13, 8"] {
            let r = s.replace(
                "Sec-WebSocket-Version: 13",
                &format!("Sec-WebSocket-Version: {version}"),
            );
            assert!(bad(check(r.as_bytes(), None)), "version {version:?}");
        }
        let no_version = s.replace("Sec-WebSocket-Version: 13\r\n", "");
        assert!(bad(check(no_version.as_bytes(), None)));
        // An upgrade has no body: a body-framing field is refused, so no
        // request can hide in one.
        for field in ["Content-Length: 5\r\n", "Content-Length: 0\r\n", "Transfer-Encoding: chunked\r\n"] {
            assert!(bad(check(&upgrade_with(field), None)), "{field:?}");
        }
    }

    #[test]
    fn every_prefix_is_incomplete() {
        for n in 0..MQTTJS.len() {
            assert_eq!(
                parse_head(&MQTTJS[..n], MAX),
                Ok(None),
                "prefix of {n} bytes"
            );
        }
        let odd = upgrade_with("x-custom:  spaced value \r\n");
        let mut with_blank_lines = b"\r\n\r\n".to_vec();
        with_blank_lines.extend_from_slice(&odd);
        for req in [&odd, &with_blank_lines] {
            for n in 0..req.len() {
                assert_eq!(parse_head(&req[..n], MAX), Ok(None), "prefix of {n} bytes");
            }
            assert!(parse_head(req, MAX).unwrap().is_some());
        }
    }

    #[test]
    fn head_size_limit() {
        let n = MQTTJS.len();
        // Exactly the limit without the blank line: too large.
        let no_end = &MQTTJS[..n - 2];
        assert_eq!(parse_head(no_end, n - 2), Err(Refusal::TooLarge));
        assert_eq!(parse_head(no_end, n - 1), Ok(None));
        // A head of exactly the limit fits; one byte less does not, even
        // with the whole head (and more) in the buffer.
        assert_eq!(parse_head(MQTTJS, n).unwrap().unwrap().len, n);
        assert_eq!(parse_head(MQTTJS, n - 1), Err(Refusal::TooLarge));
        let mut more = MQTTJS.to_vec();
        more.extend_from_slice(b"frames");
        assert_eq!(parse_head(&more, n - 1), Err(Refusal::TooLarge));
        assert_eq!(parse_head(&more, n).unwrap().unwrap().len, n);
        // A long stream of header lines with no end.
        let mut endless = b"GET /mqtt HTTP/1.1\r\n".to_vec();
        while endless.len() < 1000 {
            endless.extend_from_slice(b"X-Filler: 0123456789\r\n");
        }
        assert_eq!(parse_head(&endless[..1000], 1000), Err(Refusal::TooLarge));
        assert_eq!(parse_head(&endless[..999], 1000), Ok(None));
        assert_eq!(parse_head(b"", 0), Err(Refusal::TooLarge));
    }

    #[test]
    fn too_many_fields_is_too_large() {
        let fields = |count: usize| {
            (0..count)
                .map(|i| format!("X-F{i}: {i}\r\n"))
                .collect::<String>()
        };
        // The five fields of upgrade_with() plus these.
        let fits = upgrade_with(&fields(MAX_HEADERS - 5));
        assert_eq!(head(&fits).headers.len(), MAX_HEADERS);
        let over = upgrade_with(&fields(MAX_HEADERS - 4));
        assert_eq!(parse_head(&over, 1 << 20), Err(Refusal::TooLarge));
        // Rewriting a full head adds fields; the output still parses with
        // three more allowed.
        let h = head(&fits);
        let out = rewrite(&fits, &h, &fwd(set("a"), set("b"), Some("c")));
        let back = parse_head_limited(&out, 1 << 20, MAX_HEADERS + 3)
            .unwrap()
            .unwrap();
        assert_eq!(back.headers.len(), MAX_HEADERS + 3);
    }

    #[test]
    fn garbage_is_bad_request() {
        let cases: &[&[u8]] = &[
            b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x00", // MQTT CONNECT over plain TCP
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", // TLS ClientHello
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
            b"GET  /mqtt HTTP/1.1\r\n\r\n",
            b"GET /mqtt HTTP/1.1 \r\n\r\n",
            b"GET /mqtt HTTP/2.0\r\n\r\n",
            b"GET /mqtt FTP/1.1\r\n\r\n",
            b"GET /m qtt HTTP/1.1\r\n\r\n",
            b"GET /mqtt\xff HTTP/1.1\r\n\r\n",
            b"GET /mqtt HTTP/1.1\r\nHost : b\r\n\r\n",
            b"GET /mqtt HTTP/1.1\r\nHost: b\r\n folded\r\n\r\n",
            b"GET /mqtt HTTP/1.1\r\nHost: b\r\nNo colon\r\n\r\n",
            b"GET /mqtt HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
            b"GET /mqtt HTTP/1.1\r\nHost: a\rb\r\n\r\n",
            b"GET /mqtt HTTP/1.1\r\nHost: b\n\r\n",
            b"GET /mqtt HTTP/1.1\nHost: b\r\n\r\n",
            b"GET /mqtt HTTP/1.1\r\nHost: b\r\n\n",
            b"\nGET /mqtt HTTP/1.1\r\nHost: b\r\n\r\n",
            b"\r\n\r\n\r\x00",
        ];
        for &garbage in cases {
            let r = parse_head(garbage, MAX);
            assert!(
                matches!(r, Err(Refusal::BadRequest(_))),
                "{:?}: {r:?}",
                show(garbage)
            );
        }
    }

    #[test]
    fn list_splits_trims_and_combines() {
        let req = upgrade_with("X-L: a,b ,\t c\r\nX-Other: z\r\nx-l: ,, d ,\r\nX-L:\r\n");
        let h = head(&req);
        assert_eq!(h.list("x-l"), ["a", "b", "c", "d"]);
        assert_eq!(h.list("X-L"), h.list("x-l"));
        assert!(h.list("x-missing").is_empty());
        assert_eq!(h.list("connection"), ["Upgrade"]);
        assert!(h.has_token("Upgrade", "WebSocket"));
    }

    #[test]
    fn values_cannot_inject_lines() {
        let f = Forwarding {
            forwarded_for: set("192.0.2.1\r\nX-Evil: 1"),
            forwarded_port: append(" 80\n\r"),
            set_header: Some(("X-Real-IP".into(), "\r\n\r\nGET /admin HTTP/1.1\0".into())),
            remove: Vec::new(),
        };
        let out = rewritten(MQTTJS, &f);
        let back = head(&out);
        assert_eq!(back.len, out.len());
        assert!(values(&back, "x-evil").is_empty());
        assert_eq!(values(&back, "x-forwarded-for"), ["192.0.2.1X-Evil: 1"]);
        assert_eq!(values(&back, "x-forwarded-port"), ["80"]);
        assert_eq!(values(&back, "x-real-ip"), ["GET /admin HTTP/1.1"]);
        // A set_header name that is not a token is left out, and so are
        // empty values; incoming fields are still removed.
        let req = upgrade_with("X-Forwarded-For: 127.0.0.1\r\n");
        let f = Forwarding {
            forwarded_for: set(" \r\n"),
            forwarded_port: append(""),
            set_header: Some(("X-Evil: 1\r\nX".into(), "v".into())),
            remove: Vec::new(),
        };
        let out = rewritten(&req, &f);
        assert_eq!(out, upgrade_with(""));
        // Nor can set_header take over the forwarding fields.
        let f = Forwarding {
            forwarded_for: set("a"),
            forwarded_port: set("1"),
            set_header: Some(("x-forwarded-for".into(), "b".into())),
            remove: Vec::new(),
        };
        assert_eq!(
            values(&head(&rewritten(&req, &f)), "X-Forwarded-For"),
            ["a"]
        );
    }

    #[test]
    fn leading_empty_lines_are_not_forwarded() {
        let mut req = b"\r\n\r\n".to_vec();
        req.extend_from_slice(MQTTJS);
        let h = head(&req);
        assert_eq!(h.len, req.len());
        let out = rewrite(&req, &h, &fwd(set("192.0.2.1"), set("1"), None));
        assert!(out.starts_with(b"GET /mqtt HTTP/1.1\r\nSec-WebSocket-Version: 13\r\n"));
    }

    // Names the property test treats specially: never generated at random.
    const SPECIAL: [&str; 8] = [
        "host",
        "upgrade",
        "connection",
        "sec-websocket-key",
        "sec-websocket-version",
        "x-forwarded-for",
        "x-forwarded-port",
        "x-real-ip",
    ];

    fn random_case(name: &'static str) -> impl Strategy<Value = String> {
        proptest::collection::vec(any::<bool>(), name.len()).prop_map(move |up| {
            name.chars()
                .zip(up)
                .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
                .collect()
        })
    }

    fn field_name() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,16}"
                .prop_filter("special", |n| !SPECIAL.iter().any(|s| n.eq_ignore_ascii_case(s))),
            1 => random_case("x-forwarded-for"),
            1 => random_case("x-forwarded-port"),
            1 => random_case("x-real-ip"),
        ]
    }

    /// (name, whitespace before the value, value, whitespace after it).
    fn field() -> impl Strategy<Value = (String, String, String, String)> {
        (
            field_name(),
            "[ \t]{0,2}",
            prop_oneof![Just(String::new()), "[!-~]([ \t!-~]{0,24}[!-~])?"],
            "[ \t]{0,2}",
        )
    }

    fn edit() -> impl Strategy<Value = Edit> {
        let value = prop_oneof![
            "(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(\\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])){3}",
            "[0-9a-f]{1,4}(:[0-9a-f]{1,4}){7}",
            "[1-9][0-9]{0,4}",
        ];
        prop_oneof![
            value.clone().prop_map(Edit::Set),
            value.prop_map(Edit::Append)
        ]
    }

    /// The expected value of a forwarding field, computed from the (name,
    /// value) pairs as generated, in the order they were placed.
    fn model(fields: &[(String, String)], name: &str, edit: &Edit) -> String {
        match edit {
            Edit::Set(v) => v.clone(),
            Edit::Append(v) => {
                let mut list: Vec<String> = fields
                    .iter()
                    .filter(|(n, ..)| n.eq_ignore_ascii_case(name))
                    .flat_map(|(_, value)| {
                        value
                            .split(',')
                            .map(|e| e.trim_matches([' ', '\t']).to_string())
                    })
                    .filter(|e| !e.is_empty())
                    .collect();
                list.push(v.clone());
                list.join(", ")
            }
        }
    }

    proptest! {
        #[test]
        fn rewrite_keeps_everything_else(
            extra in proptest::collection::vec((field(), 0usize..7), 0..12),
            xff in edit(),
            xfp in edit(),
            real in proptest::option::of("(1?[0-9]?[0-9]\\.){3}1?[0-9]?[0-9]"),
            query in proptest::option::of("[a-z0-9=&/]{0,12}"),
            frames in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            // (line, (name, value)) in the order sent.
            let mut lines: Vec<(String, (String, String))> = [
                ("Host", "broker.example:8083"),
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("Sec-WebSocket-Version", "13"),
                ("Sec-WebSocket-Protocol", "mqtt"),
            ]
            .into_iter()
            .map(|(n, v)| (format!("{n}: {v}"), (n.to_string(), v.to_string())))
            .collect();
            for ((name, pre, value, post), at) in &extra {
                let at = (*at).min(lines.len());
                lines.insert(at, (format!("{name}:{pre}{value}{post}"), (name.clone(), value.clone())));
            }
            let target = match &query {
                Some(q) => format!("/mqtt?{q}"),
                None => "/mqtt".to_string(),
            };
            let mut buf = format!("GET {target} HTTP/1.1\r\n{}\r\n", lines.iter().map(|(l, _)| format!("{l}\r\n")).collect::<String>()).into_bytes();
            let head_len = buf.len();
            buf.extend_from_slice(&frames);

            let h = parse_head(&buf, MAX).unwrap().unwrap();
            prop_assert_eq!(h.len, head_len);
            prop_assert_eq!(h.check_websocket(Some("/mqtt")), Ok(()));
            let fields: Vec<_> = lines.iter().map(|(_, f)| f.clone()).collect();
            let f = Forwarding {
                forwarded_for: xff.clone(),
                forwarded_port: xfp.clone(),
                set_header: real.clone().map(|ip| ("X-Real-IP".to_string(), ip)),
                remove: Vec::new(),
            };
            let out = rewrite(&buf[..h.len], &h, &f);

            let back = parse_head(&out, MAX).unwrap().unwrap();
            prop_assert_eq!(back.len, out.len());
            prop_assert_eq!(back.check_websocket(Some("/mqtt")), Ok(()));
            prop_assert_eq!(&back.method, "GET");
            prop_assert_eq!(&back.target, &target);

            let forwarding = |n: &str| {
                n.eq_ignore_ascii_case(X_FORWARDED_FOR)
                    || n.eq_ignore_ascii_case(X_FORWARDED_PORT)
                    || (real.is_some() && n.eq_ignore_ascii_case("x-real-ip"))
            };
            let others = |h: &Head| -> Vec<(String, Vec<u8>)> {
                h.headers.iter().filter(|(n, _)| !forwarding(n)).cloned().collect()
            };
            prop_assert_eq!(others(&back), others(&h));
            // Their lines, too, are the same bytes in the same order.
            let other_lines = |b: &[u8]| -> Vec<Vec<u8>> {
                b.split(|&c| c == b'\n')
                    .filter(|l| !forwarding(std::str::from_utf8(l).unwrap().split(':').next().unwrap()))
                    .map(<[u8]>::to_vec)
                    .collect()
            };
            prop_assert_eq!(other_lines(&out), other_lines(&buf[..h.len]));

            // The forwarding fields: one each, at the end, in order.
            let mut want = vec![
                (X_FORWARDED_FOR.to_string(), model(&fields, X_FORWARDED_FOR, &xff).into_bytes()),
                (X_FORWARDED_PORT.to_string(), model(&fields, X_FORWARDED_PORT, &xfp).into_bytes()),
            ];
            if let Some(ip) = &real {
                want.push(("X-Real-IP".to_string(), ip.clone().into_bytes()));
            }
            let got: Vec<_> = back.headers.iter().filter(|(n, _)| forwarding(n)).cloned().collect();
            prop_assert_eq!(&got, &want);
            prop_assert_eq!(&back.headers[back.headers.len() - want.len()..], &want[..]);
        }
    }
}
