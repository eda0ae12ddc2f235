//! nginx's side of `convert-nginx`: the config parsed by nginx-lint-parser,
//! then walked the way nginx reads it. `upstream` blocks are collected
//! first (nginx lets `proxy_pass` name one defined later); settings flow
//! down from `stream`/`http` to `server` to `location`, an inner level's
//! list directives (`set_real_ip_from`, `proxy_set_header`, `allow`/`deny`,
//! `ssl_certificate`) replacing the outer level's as nginx does; every
//! `listen` of a server with a `proxy_pass` becomes one listener.
//!
//! Where a translation could let in a client nginx kept out, or believe an
//! address nginx did not, it errs the other way and says so.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{bail, Result};
use ipnet::IpNet;
use nginx_lint_parser::{
    ast::{ArgumentValue, Block, Directive},
    syntax_kind::SyntaxKind,
};

use super::{Conversion, Converted, Draft, Skipped};
use crate::config::{
    AcceptProxy, Balance, ClientAuth, Dur, ForwardMode, MinVersion, Protocol, SendProxy, MAX_WEIGHT,
};

/// Which nginx module a block belongs to: `stream` forwards bytes, `http`
/// (here) WebSocket upgrades.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Module {
    Stream,
    Http,
}

impl Module {
    fn name(self) -> &'static str {
        match self {
            Module::Stream => "stream",
            Module::Http => "http",
        }
    }
}

/// Reads `text` (a whole nginx.conf, or the guide's `stream { }` and
/// `http { }` blocks alone). Err when the syntax is not nginx's; nginx may
/// still refuse a config that converts.
pub fn convert(text: &str) -> Result<Conversion> {
    // The parser recurses once per level (and overflows the stack a few
    // thousand levels down); real configs nest a handful.
    if let Some(line) = too_deep(text) {
        bail!("blocks nested more than {MAX_DEPTH} deep at line {line}");
    }
    let config = match nginx_lint_parser::parse_string(text) {
        Ok(c) => c,
        Err(e) => bail!("not nginx config syntax: {e}"),
    };
    let mut walk = Walk::default();
    for d in config.directives() {
        match (d.name.as_str(), &d.block) {
            ("stream", Some(b)) => walk.module(Module::Stream, b),
            ("http", Some(b)) => walk.module(Module::Http, b),
            ("server" | "upstream", _) => {
                walk.skip(
                    d,
                    "outside a stream or http block: wrap it in the one it belongs to",
                );
            }
            _ => walk.skip_unknown(d),
        }
    }
    Ok(Conversion {
        listeners: walk.settle(),
        skipped: walk.skipped,
    })
}

const MAX_DEPTH: usize = 64;

/// The line where block nesting passes MAX_DEPTH, if it does, counted on
/// the parser's own tokens (so quotes, comments and escapes are read alike).
fn too_deep(text: &str) -> Option<usize> {
    let (mut depth, mut line) = (0usize, 1);
    for (kind, token) in nginx_lint_parser::lexer_rowan::tokenize(text) {
        match kind {
            SyntaxKind::L_BRACE => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Some(line);
                }
            }
            SyntaxKind::R_BRACE => depth = depth.saturating_sub(1),
            _ => line += token.matches('\n').count(),
        }
    }
    None
}

/// A list directive's values at one level: the first use at a level
/// replaces what the outer level set, later uses add to it.
#[derive(Debug, Clone)]
struct Inherited<T> {
    items: Vec<T>,
    own: bool,
}

impl<T> Default for Inherited<T> {
    fn default() -> Self {
        Inherited {
            items: Vec::new(),
            own: false,
        }
    }
}

impl<T: Clone> Inherited<T> {
    fn push(&mut self, item: T) {
        self.here();
        self.items.push(item);
    }

    /// This level has the directive (even one not translated): the outer
    /// level's values no longer apply.
    fn here(&mut self) {
        if !self.own {
            self.items.clear();
            self.own = true;
        }
    }

    /// The same values, as seen from the next level in.
    fn inner(&self) -> Self {
        Inherited {
            items: self.items.clone(),
            own: false,
        }
    }
}

/// `proxy_set_header NAME VALUE`, the value with its variables as written
/// (`$remote_addr`).
#[derive(Debug, Clone)]
struct SetHeader {
    name: String,
    value: String,
    line: usize,
    text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Allow,
    Deny,
}

/// Who an `allow`/`deny` rule names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    All,
    Net(IpNet),
    /// `unix:`: clients of a unix socket, never a TCP one.
    Unix,
}

#[derive(Debug, Clone)]
struct AccessRule {
    access: Access,
    who: Who,
    line: usize,
    text: String,
}

/// What servers and locations inherit from the levels around them: one
/// field per directive (hence the flags).
#[derive(Debug, Clone, Default)]
#[allow(clippy::struct_excessive_bools)]
struct Scope {
    trusted: Inherited<IpNet>,
    real_ip_header: Option<String>,
    real_ip_recursive: bool,
    /// stream `proxy_protocol on`.
    send_proxy: bool,
    connect_timeout: Option<Dur>,
    proxy_protocol_timeout: Option<Dur>,
    headers: Inherited<SetHeader>,
    access: Inherited<AccessRule>,
    certs: Inherited<PathBuf>,
    keys: Inherited<PathBuf>,
    /// `ssl_protocols`, as written, with its line and text.
    protocols: Option<(Vec<String>, usize, String)>,
    client_ca: Option<PathBuf>,
    verify_client: Option<ClientAuth>,
    handshake_timeout: Option<Dur>,
    /// An `include` here or further out: it may have set anything.
    includes: bool,
    /// A real-IP directive at this very level.
    realip_here: bool,
    /// Requests checked in ways splicer does not follow (`if`, `auth_*`).
    checks: bool,
    /// Trust that could not be translated (left out): the clients rules
    /// are checked against may differ.
    trust_reduced: bool,
    /// An IPv4-mapped allow/deny left out.
    access_mapped: bool,
    /// `ssl on;`: every listen here is TLS.
    ssl_on: bool,
}

impl Scope {
    fn inner(&self) -> Scope {
        Scope {
            trusted: self.trusted.inner(),
            headers: self.headers.inner(),
            access: self.access.inner(),
            certs: self.certs.inner(),
            keys: self.keys.inner(),
            realip_here: false,
            ..self.clone()
        }
    }
}

/// A `listen` as far as splicer can follow it: nginx's flags, as written.
#[derive(Debug, Clone, Copy)]
#[allow(clippy::struct_excessive_bools)]
struct Listen {
    addr: SocketAddr,
    proxy_protocol: bool,
    ssl: bool,
    /// `default_server`: nginx's choice among servers on one address.
    default: bool,
    /// `ipv6only=off`: nginx saw IPv4 clients as `::ffff:` addresses.
    v4_mapped: bool,
}

impl Listen {
    /// `[::]` with nginx's default `ipv6only=on`: IPv6 clients only.
    fn v6_only(&self) -> bool {
        self.addr.is_ipv6() && !self.v4_mapped
    }
}

/// Where `proxy_pass` sends clients.
#[derive(Debug, Clone, Default)]
struct Pass {
    /// Each address once, with its weight (nginx counts a server listed
    /// twice twice).
    upstream: Vec<(String, u32)>,
    balance: Option<Balance>,
    notes: Vec<String>,
}

impl Pass {
    /// `upstream` as splicer writes it: `ADDR`, or `ADDR weight=N`.
    fn entries(&self) -> Vec<String> {
        self.upstream
            .iter()
            .map(|(addr, w)| match w {
                1 => addr.clone(),
                w => format!("{addr} weight={w}"),
            })
            .collect()
    }
}

/// An http server's WebSocket location: its path (None: any, `location /`),
/// how nginx matched it, and what is in force inside it.
struct WsLocation {
    path: Option<String>,
    kind: Kind,
    scope: Scope,
    pass: Pass,
    /// nginx answered this path from another location first: an exact one,
    /// or a regular expression that matches it (or that splicer cannot read).
    shadowed: bool,
}

/// A listener before `settle`, with what nginx applied to its socket
/// whichever server it came from.
struct Found {
    converted: Converted,
    /// nginx's `default_server` among servers on one address.
    default: bool,
    socket: Socket,
}

/// A listen's socket options: nginx applies them to the address, for
/// every server on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)]
struct Socket {
    ssl: bool,
    proxy_protocol: bool,
    /// Takes IPv4 clients (an IPv4 address, or a dual-stack `[::]`).
    ipv4_too: bool,
}

#[derive(Default)]
struct Walk {
    /// Named once `settle` has kept those splicer can bind together.
    listeners: Vec<Found>,
    skipped: Vec<Skipped>,
}

/// A directive as written, for messages: name and arguments, `{ ... }` for
/// a block, cut at 100 characters.
fn show(d: &Directive) -> String {
    let mut s = d.name.clone();
    for a in &d.args {
        s.push(' ');
        s.push_str(&a.raw);
    }
    if d.block.is_some() {
        s.push_str(" { ... }");
    }
    if s.chars().count() > 100 {
        s = s.chars().take(97).collect::<String>() + "...";
    }
    s
}

/// An argument as nginx would expand it, variables keeping their `$`.
fn arg(d: &Directive, i: usize) -> Option<String> {
    d.args.get(i).map(|a| match &a.value {
        ArgumentValue::Variable(v) => format!("${v}"),
        _ => a.as_str().to_string(),
    })
}

/// nginx's time syntax: `5` (seconds), `500ms`, `1m30s`, `1m 30s`, `2h`,
/// `1d`; each unit at most once, larger units first.
fn nginx_time(s: &str) -> Option<Dur> {
    const UNITS: [(&str, u64); 8] = [
        ("y", 365 * 86_400_000),
        ("M", 30 * 86_400_000),
        ("w", 7 * 86_400_000),
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
        ("ms", 1),
    ];
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Dur(Duration::from_secs(secs)));
    }
    let mut total: u64 = 0;
    let mut rest = s;
    let mut last = None;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == ' ')
            .unwrap_or(rest.len());
        let i = UNITS.iter().position(|(u, _)| *u == &rest[..unit_len])?;
        if last.is_some_and(|l| i <= l) {
            return None;
        }
        last = Some(i);
        total = total.checked_add(n.checked_mul(UNITS[i].1)?)?;
        rest = rest[unit_len..].trim_start();
    }
    last.map(|_| Dur(Duration::from_millis(total)))
}

/// A header name as splicer's config takes it.
fn header_name(n: &str) -> bool {
    !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether a header may carry the client's address (`set-real-ip-header`):
/// a header name, and not one the upgrade itself or the other forwarding
/// keys need.
fn carries_client(lowercase: &str) -> bool {
    const TAKEN: [&str; 9] = [
        "host",
        "upgrade",
        "connection",
        "content-length",
        "transfer-encoding",
        "te",
        "x-forwarded-for",
        "x-forwarded-port",
        "keep-alive",
    ];
    header_name(lowercase) && !TAKEN.contains(&lowercase) && !lowercase.starts_with("sec-websocket-")
}

/// Why an IPv4-mapped range (`::ffff:10.0.0.0/104`) is left out.
const MAPPED: &str =
    "an IPv4-mapped IPv6 range: nginx never matches an IPv4 client against it, splicer would";

/// Whether a range is IPv4-mapped IPv6, which splicer reads as the IPv4
/// range it maps.
fn is_mapped(net: &IpNet) -> bool {
    matches!(net, IpNet::V6(v6) if v6.prefix_len() >= 96 && v6.addr().to_ipv4_mapped().is_some())
}

/// `set_real_ip_from`, `allow`, `deny`: an address or a CIDR.
fn cidr(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// A `listen` address: `1883`, `*:1883`, `10.0.0.1:1883`, `[::]:1883`,
/// `10.0.0.1` (port 80), `localhost:1883`.
fn listen_addr(s: &str) -> Option<SocketAddr> {
    let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    if let Ok(port) = s.parse::<u16>() {
        return Some(SocketAddr::new(any, port));
    }
    if let Some(port) = s.strip_prefix("*:") {
        return port.parse().ok().map(|p| SocketAddr::new(any, p));
    }
    if let Some(port) = s.strip_prefix("localhost:") {
        return port
            .parse()
            .ok()
            .map(|p| SocketAddr::new(Ipv4Addr::LOCALHOST.into(), p));
    }
    s.parse::<SocketAddr>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 80)))
}

/// How much of a port a listen address takes, narrowest first: splicer
/// (like any program without nginx's dispatch) cannot bind an address and
/// a wildcard that covers it on one port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Breadth {
    One,
    AnyV4,
    /// `[::]`: splicer's is dual-stack, IPv4 included.
    Any,
}

fn breadth(a: SocketAddr) -> Breadth {
    match a.ip() {
        ip if !ip.is_unspecified() => Breadth::One,
        IpAddr::V4(_) => Breadth::AnyV4,
        IpAddr::V6(_) => Breadth::Any,
    }
}

/// A host name as splicer resolves it: letters, digits, `-`, `.`, `_`.
fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars().any(|c| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// An upstream address as splicer takes it: `10.0.0.1:1883`, `[::1]:1883`,
/// `broker.example:1883`; without a port, `default_port` (http's 80), or
/// None in stream, where nginx wants one.
fn upstream_addr(s: &str, default_port: Option<u16>) -> Option<String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Some(a.to_string());
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return default_port.map(|p| SocketAddr::new(ip, p).to_string());
    }
    match s.rsplit_once(':') {
        Some((host, port)) if is_host_name(host) && port.parse::<u16>().is_ok() => Some(s.to_string()),
        None if is_host_name(s) => default_port.map(|p| format!("{s}:{p}")),
        _ => None,
    }
}

/// Every client, for a listener that must refuse them all.
fn everyone() -> Vec<IpNet> {
    vec![
        IpNet::new(Ipv4Addr::UNSPECIFIED.into(), 0).expect("/0"),
        IpNet::new(Ipv6Addr::UNSPECIFIED.into(), 0).expect("/0"),
    ]
}

/// Directives splicer has no use for, or no equivalent of, and why.
fn unknown_reason(name: &str) -> &'static str {
    match name {
        "user" | "worker_processes" | "worker_rlimit_nofile" | "worker_cpu_affinity" | "worker_priority"
        | "worker_shutdown_timeout" | "events" | "pid" | "daemon" | "master_process" | "load_module"
        | "thread_pool" | "pcre_jit" | "env" | "lock_file" => {
            "process settings: splicer is one process with a thread per core, its limits set by its systemd unit"
        }
        "error_log" | "access_log" | "log_format" | "open_log_file_cache" => {
            "logging: splicer writes one close line per connection to stderr (log-level, log-format)"
        }
        "include" => "included files are not read: convert each one too",
        "resolver" | "resolver_timeout" => {
            "upstream names are resolved with the resolv-conf file (resolv-conf, resolve-interval)"
        }
        "proxy_timeout" | "proxy_read_timeout" | "proxy_send_timeout" | "send_timeout" | "keepalive_timeout"
        | "client_header_timeout" | "client_body_timeout" => {
            "splicer does not time out an established connection (an mqtt listener hands the CONNECT's keep-alive to TCP_USER_TIMEOUT)"
        }
        "proxy_buffering" | "proxy_buffer_size" | "proxy_buffers" | "proxy_busy_buffers_size"
        | "proxy_request_buffering" | "proxy_upload_rate" | "proxy_download_rate" | "sendfile" | "tcp_nopush"
        | "tcp_nodelay" | "proxy_socket_keepalive" | "client_max_body_size" | "client_body_buffer_size"
        | "large_client_header_buffers" | "preread_buffer_size" | "preread_timeout" => {
            "buffering and socket tuning: the kernel carries the bytes once the handshake is done"
        }
        "server_name" => "splicer tells listeners apart by address, not by name",
        "ssl_crl" | "ssl_ocsp" | "ssl_ocsp_responder" | "ssl_stapling" | "ssl_stapling_verify" => {
            "splicer reads no CRL and asks no OCSP responder: a revoked client certificate is still accepted"
        }
        "ssl_verify_depth" => {
            "splicer accepts a client chain of any length that ends at tls-client-ca"
        }
        "ssl_ciphers" | "ssl_prefer_server_ciphers" | "ssl_session_cache" | "ssl_session_timeout"
        | "ssl_session_tickets" | "ssl_session_ticket_key" | "ssl_ecdh_curve" | "ssl_dhparam" | "ssl_conf_command"
        | "ssl_password_file" | "ssl_early_data" | "ssl_buffer_size" | "ssl_trusted_certificate" => {
            "splicer uses rustls's cipher suites, curves, session cache and tickets"
        }
        "ssl_preread" => {
            "routing by server name without terminating is protocol = \"tls-passthrough\" with sni routes"
        }
        "map" | "geo" | "split_clients" | "set" => "nginx variables are not evaluated",
        "if" | "internal" | "limit_except" | "auth_request" | "auth_basic" | "auth_jwt" | "return" | "rewrite" => {
            "conditions and checks of requests are not evaluated: the listener refuses every client instead"
        }
        "limit_conn" | "limit_conn_zone" | "limit_req" | "limit_req_zone" | "limit_rate" => {
            "limits are per listener in splicer: max-conns, rate-limit and max-connect-rate"
        }
        "proxy_next_upstream" | "proxy_next_upstream_tries" | "proxy_next_upstream_timeout" => {
            "splicer tries the next upstream when a connect fails, every upstream once"
        }
        "proxy_ssl" | "proxy_ssl_certificate" | "proxy_ssl_certificate_key" | "proxy_ssl_verify"
        | "proxy_ssl_server_name" => "splicer does not speak TLS to upstreams",
        "root" | "alias" | "index" | "try_files" | "types" | "default_type" | "error_page"
        | "add_header" | "charset" | "gzip" | "expires" | "server_tokens" | "autoindex" => {
            "serving HTTP content: splicer only carries WebSocket upgrades"
        }
        _ => "splicer has no equivalent",
    }
}

impl Walk {
    fn skip(&mut self, d: &Directive, why: impl Into<String>) {
        self.skip_text(d.span.start.line, show(d), why);
    }

    fn skip_text(&mut self, line: usize, text: String, why: impl Into<String>) {
        self.skipped.push(Skipped {
            line,
            text,
            why: why.into(),
        });
    }

    fn skip_unknown(&mut self, d: &Directive) {
        self.skip(d, unknown_reason(&d.name));
    }

    /// Listens splicer cannot bind together, once every server is read. On
    /// one address nginx chose among servers by name: the default_server
    /// (else the first) is kept. A wildcard beside a narrower address on its
    /// port: the narrower is kept, and clients of the wildcard's other
    /// addresses go unserved rather than reach a server nginx kept apart.
    fn settle(&mut self) -> Vec<Converted> {
        let found = std::mem::take(&mut self.listeners);
        let addr = |i: usize| found[i].converted.draft.listen;
        let n = found.len();
        let mut gone: Vec<Option<String>> = vec![None; n];
        let mut at: HashMap<SocketAddr, Vec<usize>> = HashMap::new();
        for i in 0..n {
            at.entry(addr(i)).or_default().push(i);
        }
        for (a, on) in at.iter().filter(|(_, on)| on.len() > 1) {
            // nginx applied ssl and proxy_protocol to the address, for all
            // its servers, and kept IPv4 clients from a `[::]` without them:
            // servers that differ there cannot be one listener.
            if on.iter().any(|&i| found[i].socket != found[on[0]].socket) {
                for &i in on {
                    gone[i] = Some(format!(
                        "the servers on {a} differ in ssl, proxy_protocol or IPv4, which nginx applied to the address as a whole: none is translated"
                    ));
                }
                continue;
            }
            let win = on.iter().copied().find(|&i| found[i].default).unwrap_or(on[0]);
            for &i in on.iter().filter(|&&i| i != win) {
                gone[i] = Some(format!(
                    "the {} listens on {a} too: nginx chose among them by name; splicer has one listener per address and keeps {}",
                    found[win].converted.origin,
                    if found[win].default { "the default_server" } else { "the first" }
                ));
            }
        }
        let mut by_port: HashMap<u16, Vec<usize>> = HashMap::new();
        for i in (0..n).filter(|&i| gone[i].is_none()) {
            by_port.entry(addr(i).port()).or_default().push(i);
        }
        for on_port in by_port.values() {
            for &i in on_port {
                let covered: Vec<String> = on_port
                    .iter()
                    .filter(|&&j| j != i)
                    .filter(|&&j| match breadth(addr(i)) {
                        Breadth::One => false,
                        Breadth::AnyV4 => breadth(addr(j)) == Breadth::One && addr(j).is_ipv4(),
                        Breadth::Any => true,
                    })
                    .map(|&j| addr(j).to_string())
                    .collect();
                if !covered.is_empty() {
                    gone[i] = Some(format!(
                        "splicer cannot listen on {} beside {}: only those are kept, and clients of the other addresses nginx served here are not served",
                        addr(i),
                        covered.join(", ")
                    ));
                }
            }
        }
        // Names by module and port, numbered from the second on.
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut kept = Vec::new();
        for (Found { converted: mut l, .. }, why) in found.into_iter().zip(gone) {
            if let Some(why) = why {
                self.skip_text(l.line, format!("listen {}", l.draft.listen), why);
                continue;
            }
            let module = match l.draft.protocol {
                Protocol::Ws => "http",
                _ => "stream",
            };
            let base = format!("{module}-{}", l.draft.listen.port());
            let count = names.entry(base.clone()).or_insert(0);
            *count += 1;
            l.draft.name = match *count {
                1 => base,
                c => format!("{base}-{c}"),
            };
            kept.push(l);
        }
        kept
    }

    /// A `stream { }` or `http { }` block.
    fn module(&mut self, m: Module, block: &Block) {
        // nginx matches upstream names without regard to case.
        let mut upstreams = HashMap::new();
        for d in block.directives().filter(|d| d.name == "upstream") {
            match (arg(d, 0), &d.block) {
                (Some(name), Some(b)) if d.args.len() == 1 => {
                    let pass = self.upstream_block(m, &name, b);
                    upstreams.insert(name.to_ascii_lowercase(), pass);
                }
                _ => self.skip(d, "an upstream block takes a name"),
            }
        }
        let mut scope = Scope::default();
        let mut servers = Vec::new();
        for d in block.directives() {
            match d.name.as_str() {
                "upstream" => {}
                "server" => servers.push(d),
                _ => self.setting(&mut scope, m, d),
            }
        }
        // Settings apply to every server whatever their order in the block.
        for d in servers {
            match &d.block {
                Some(b) => self.server(m, d.span.start.line, b, &scope, &upstreams),
                None => self.skip(d, "a server outside an upstream block needs a { } body"),
            }
        }
    }

    /// A directive of a level's settings: taken into `scope`, or named.
    fn setting(&mut self, scope: &mut Scope, m: Module, d: &Directive) {
        match d.name.as_str() {
            "include" => scope.includes = true,
            "if" | "internal" | "limit_except" | "auth_request" | "auth_basic" | "auth_jwt" | "return"
            | "rewrite" => {
                scope.checks = true;
            }
            _ => {}
        }
        if !self.take(scope, m, d) {
            self.skip_unknown(d);
        }
    }

    /// An `upstream NAME { }` block.
    fn upstream_block(&mut self, m: Module, name: &str, block: &Block) -> Pass {
        let mut pass = Pass::default();
        let default_port = match m {
            Module::Http => Some(80),
            Module::Stream => None,
        };
        for d in block.directives() {
            match d.name.as_str() {
                "server" => self.upstream_server(d, default_port, &mut pass),
                "least_conn" => pass.balance = Some(Balance::LeastConn),
                "ip_hash" => Self::hash_source(&mut pass, name),
                "hash" if arg(d, 0).as_deref() == Some("$remote_addr") => Self::hash_source(&mut pass, name),
                "hash" => self.skip(
                    d,
                    "splicer hashes only the client address (balance = \"source\") or the MQTT client ID",
                ),
                "random" => self.skip(
                    d,
                    "splicer balances round-robin, least-conn, by source or by client ID",
                ),
                "zone" | "keepalive" | "keepalive_requests" | "keepalive_time" | "keepalive_timeout" => {
                    self.skip(
                        d,
                        "not needed: splicer keeps no shared zone and no idle upstream connections",
                    );
                }
                _ => self.skip_unknown(d),
            }
        }
        pass
    }

    fn hash_source(pass: &mut Pass, name: &str) {
        pass.balance = Some(Balance::Source);
        pass.notes.push(format!(
            "upstream {name}: balance = \"source\" keeps each client on one broker, but not on the broker nginx's hash chose"
        ));
    }

    /// `server ADDR [weight=N] [down] [backup] ...;` inside an upstream.
    fn upstream_server(&mut self, d: &Directive, default_port: Option<u16>, pass: &mut Pass) {
        let Some(addr) = arg(d, 0).and_then(|a| upstream_addr(&a, default_port)) else {
            return self.skip(d, "splicer connects to IP:PORT or NAME:PORT only");
        };
        let mut weight = 1u32;
        let mut down = false;
        for p in d
            .args
            .iter()
            .skip(1)
            .map(nginx_lint_parser::ast::Argument::as_str)
        {
            let param =
                |w: &mut Walk, why: &str| w.skip_text(d.span.start.line, format!("{} ({p})", show(d)), why);
            match p.split_once('=') {
                Some(("weight", n)) => match n.parse::<u32>() {
                    Ok(n) if n <= MAX_WEIGHT => weight = n,
                    Ok(_) => {
                        weight = MAX_WEIGHT;
                        param(self, "splicer's weights go up to 256: taken as 256");
                    }
                    Err(_) => return self.skip(d, "a weight is a whole number"),
                },
                Some(("max_fails" | "fail_timeout", _)) => param(
                    self,
                    "splicer takes an upstream down after health-fall failed connects or checks, and back after health-rise good checks",
                ),
                None if p == "down" => down = true,
                None if p == "backup" => {
                    return self.skip(
                        d,
                        "splicer has no backup servers: list it as an upstream to share the load, or leave it out",
                    );
                }
                None if p == "resolve" => {}
                _ => param(self, "splicer has no equivalent of this parameter"),
            }
        }
        // `down` whatever its place among the parameters: no new clients.
        if down {
            weight = 0;
        }
        // Names are the same whatever their case.
        match pass
            .upstream
            .iter_mut()
            .find(|(a, _)| a.eq_ignore_ascii_case(&addr))
        {
            Some((_, w)) => *w = (*w + weight).min(MAX_WEIGHT),
            None => pass.upstream.push((addr, weight)),
        }
    }

    /// `proxy_pass`: an upstream block's name, or an address (http: a URL).
    /// `location` is the http location's path, for a URI that replaces it.
    fn proxy_pass(
        &mut self,
        m: Module,
        d: &Directive,
        upstreams: &HashMap<String, Pass>,
        location: Option<&str>,
    ) -> Option<Pass> {
        let target = arg(d, 0)?;
        if target.contains('$') {
            self.skip(
                d,
                "nginx variables are not evaluated: name an upstream block or an address",
            );
            return None;
        }
        let (host, default_port, mut notes) = match m {
            Module::Stream => (target.as_str(), None, Vec::new()),
            Module::Http => {
                let Some(rest) = target
                    .get(..7)
                    .filter(|s| s.eq_ignore_ascii_case("http://"))
                    .map(|_| &target[7..])
                else {
                    self.skip(
                        d,
                        "splicer forwards to http:// upstreams only (not https://, grpc:// or unix:)",
                    );
                    return None;
                };
                let (host, uri) = match rest.find('/') {
                    Some(i) => (&rest[..i], Some(&rest[i..])),
                    None => (rest, None),
                };
                let notes = match (uri, location) {
                    (Some(uri), Some(path)) if uri != path => vec![format!(
                        "nginx replaced the location's {path} with {uri} in the path it sent on; splicer sends the path as the client sent it"
                    )],
                    _ => Vec::new(),
                };
                (host, Some(80), notes)
            }
        };
        if let Some(pass) = upstreams.get(&host.to_ascii_lowercase()) {
            let mut pass = pass.clone();
            pass.notes.append(&mut notes);
            return Some(pass);
        }
        match upstream_addr(host, default_port) {
            Some(addr) => Some(Pass {
                upstream: vec![(addr, 1)],
                balance: None,
                notes,
            }),
            None => {
                self.skip(
                    d,
                    "no upstream block of that name, and not an IP:PORT or NAME:PORT",
                );
                None
            }
        }
    }

    /// A directive that sets something inner levels inherit. false when it
    /// is not one of those (the caller decides what else it may be).
    fn take(&mut self, scope: &mut Scope, m: Module, d: &Directive) -> bool {
        let a0 = arg(d, 0).unwrap_or_default();
        let line = d.span.start.line;
        let time = |w: &mut Walk, slot: &mut Option<Dur>| match nginx_time(&a0) {
            Some(t) if !t.0.is_zero() => *slot = Some(t),
            Some(_) => w.skip(d, "splicer's timeouts are more than zero"),
            None => w.skip(
                d,
                "not a time splicer reads (ms, s, m, h, d, w, M, y; larger units first)",
            ),
        };
        match (m, d.name.as_str()) {
            (_, "set_real_ip_from") => {
                if !scope.trusted.own {
                    // This level's list replaces the outer one, and with it
                    // what could not be read there.
                    scope.trust_reduced = false;
                }
                scope.realip_here = true;
                match cidr(&a0) {
                    Some(net) if !is_mapped(&net) => scope.trusted.push(net),
                    Some(_) => {
                        scope.trusted.here();
                        scope.trust_reduced = true;
                        self.skip(d, MAPPED);
                    }
                    None => {
                        // It still replaces the outer level's list: trust less.
                        scope.trusted.here();
                        scope.trust_reduced = true;
                        self.skip(
                        d,
                        "splicer trusts IP addresses and CIDRs only; nor does it trust the outer level's set_real_ip_from, which this one replaces",
                    );
                    }
                }
            }
            (Module::Http, "real_ip_header") if a0 == "proxy_protocol" || header_name(&a0) => {
                scope.real_ip_header = Some(a0);
                scope.realip_here = true;
            }
            (Module::Http, "real_ip_header") => {
                // No header splicer can read: trust none (less, never more).
                scope.trusted.here();
                scope.realip_here = true;
                scope.trust_reduced = true;
                self.skip(
                    d,
                    "not a header name splicer reads (letters, digits, - and _); nothing is trusted instead",
                );
            }
            (Module::Http, "real_ip_recursive") => {
                scope.real_ip_recursive = a0 == "on";
                scope.realip_here = true;
            }
            (Module::Stream, "proxy_protocol") => scope.send_proxy = a0 == "on",
            (_, "proxy_connect_timeout") => time(self, &mut scope.connect_timeout),
            (Module::Stream, "proxy_protocol_timeout") => time(self, &mut scope.proxy_protocol_timeout),
            (Module::Stream, "ssl_handshake_timeout") => time(self, &mut scope.handshake_timeout),
            (Module::Http, "proxy_set_header") => scope.headers.push(SetHeader {
                name: a0,
                value: arg(d, 1).unwrap_or_default(),
                line,
                text: show(d),
            }),
            (Module::Http, "proxy_http_version") if a0 == "1.1" => {}
            (_, "allow" | "deny") => {
                if !scope.access.own {
                    scope.access_mapped = false;
                }
                let who = match a0.as_str() {
                    "all" => Who::All,
                    "unix:" => Who::Unix,
                    other => match cidr(other) {
                        Some(net) if !is_mapped(&net) => Who::Net(net),
                        Some(_) => {
                            if !scope.access.own {
                                scope.access_mapped = false;
                            }
                            scope.access.here();
                            scope.access_mapped = true;
                            self.skip(d, MAPPED);
                            return true;
                        }
                        None => {
                            scope.access.here();
                            self.skip(d, "not an address, CIDR, all or unix: (nginx would refuse it)");
                            return true;
                        }
                    },
                };
                scope.access.push(AccessRule {
                    access: if d.name == "allow" {
                        Access::Allow
                    } else {
                        Access::Deny
                    },
                    who,
                    line,
                    text: show(d),
                });
            }
            (Module::Http, "ssl") => scope.ssl_on = a0 == "on",
            (_, "ssl_certificate") => scope.certs.push(a0.into()),
            (_, "ssl_certificate_key") => scope.keys.push(a0.into()),
            (_, "ssl_protocols") => {
                scope.protocols = Some((
                    d.args.iter().map(|a| a.as_str().to_string()).collect(),
                    line,
                    show(d),
                ));
            }
            (_, "ssl_client_certificate") => scope.client_ca = Some(a0.into()),
            (_, "ssl_verify_client") => match a0.as_str() {
                "on" => scope.verify_client = Some(ClientAuth::Required),
                "optional" => scope.verify_client = Some(ClientAuth::Optional),
                "off" => scope.verify_client = None,
                _ => self.skip(
                    d,
                    "splicer checks every certificate a client shows against tls-client-ca",
                ),
            },
            _ => return false,
        }
        true
    }

    /// A `server { }` block of a stream or http module.
    fn server(
        &mut self,
        m: Module,
        line: usize,
        block: &Block,
        outer: &Scope,
        upstreams: &HashMap<String, Pass>,
    ) {
        let mut scope = outer.inner();
        let mut listens = Vec::new();
        let mut pass_directive = None;
        let mut locations = Vec::new();
        for d in block.directives() {
            match (m, d.name.as_str()) {
                (_, "listen") => listens.extend(self.listen(m, d)),
                (Module::Stream, "proxy_pass") => pass_directive = Some(d),
                (Module::Http, "location") => locations.push(d),
                _ => self.setting(&mut scope, m, d),
            }
        }
        let (pass, ws) = match m {
            Module::Stream => (
                pass_directive.and_then(|d| self.proxy_pass(m, d, upstreams, None)),
                None,
            ),
            Module::Http => match self.ws_location(&locations, &scope, upstreams) {
                Some(ws) => (Some(ws.pass.clone()), Some(ws)),
                None => (None, None),
            },
        };
        let Some(pass) = pass else {
            if !listens.is_empty() {
                self.skip_text(
                    line,
                    "server { ... }".into(),
                    "no proxy_pass splicer can follow: nothing to forward to",
                );
            }
            return;
        };
        if pass.upstream.iter().all(|(_, w)| *w == 0) {
            let why = match pass.upstream.is_empty() {
                true => "no upstream splicer can connect to: each server was left out",
                false => "every upstream server is down: nothing to forward to",
            };
            self.skip_text(line, "server { ... }".into(), why);
            return;
        }
        // Addresses that several listens share are settled at the end.
        for (listen, merged) in dual_stack(listens) {
            let mut converted = self.listener(m, line, listen, &scope, &pass, ws.as_ref());
            if merged {
                converted.notes.push(format!(
                    "nginx's `listen {port}` and `listen [::]:{port}` are one dual-stack listener here",
                    port = listen.addr.port()
                ));
            } else if listen.v6_only() {
                converted.notes.push(format!(
                    "{} also takes IPv4 clients here (nginx's [::] took only IPv6 ones, ipv6only=on)",
                    listen.addr
                ));
            }
            let ssl = listen.ssl || ws.as_ref().map_or(&scope, |w| &w.scope).ssl_on;
            let socket = Socket {
                ssl,
                proxy_protocol: listen.proxy_protocol,
                ipv4_too: merged || !listen.v6_only(),
            };
            self.listeners.push(Found {
                converted,
                default: listen.default,
                socket,
            });
        }
    }

    /// `listen ADDR [proxy_protocol] [ssl] ...`.
    fn listen(&mut self, m: Module, d: &Directive) -> Option<Listen> {
        let Some(addr) = arg(d, 0).and_then(|a| listen_addr(&a)) else {
            self.skip(d, "splicer listens on IP:PORT only (not unix: sockets or names)");
            return None;
        };
        let mut listen = Listen {
            addr,
            proxy_protocol: false,
            ssl: false,
            default: false,
            v4_mapped: false,
        };
        for p in d
            .args
            .iter()
            .skip(1)
            .map(nginx_lint_parser::ast::Argument::as_str)
        {
            match p {
                "proxy_protocol" => listen.proxy_protocol = true,
                "ssl" => listen.ssl = true,
                "default_server" | "default" => listen.default = true,
                "ipv6only=on" => {}
                "ipv6only=off" => {
                    listen.v4_mapped = true;
                }
                "udp" | "quic" | "http2" | "http3" => {
                    let what = match m {
                        Module::Http => "TCP and HTTP/1.1 upgrades",
                        Module::Stream => "TCP",
                    };
                    self.skip(d, format!("splicer carries {what} only"));
                    return None;
                }
                _ => self.skip_text(
                    d.span.start.line,
                    format!("{} ({p})", show(d)),
                    "socket options of listen are not translated",
                ),
            }
        }
        if arg(d, 0).is_some_and(|a| a.starts_with("localhost:")) {
            self.skip(
                d,
                "taken as 127.0.0.1 (nginx bound every address localhost resolves to)",
            );
        }
        Some(listen)
    }

    /// The location nginx would pick for the most specific WebSocket path:
    /// an exact one (`location = /mqtt`) first, then the longest prefix.
    /// The others are named as not translated.
    fn ws_location(
        &mut self,
        locations: &[&Directive],
        server: &Scope,
        upstreams: &HashMap<String, Pass>,
    ) -> Option<WsLocation> {
        let mut found: Vec<(WsLocation, &Directive)> = Vec::new();
        // Locations splicer does not follow, and why; named once the chosen
        // one says where their requests go now.
        let mut passed_over: Vec<(&Directive, &str)> = Vec::new();
        // What nginx looks at before a prefix location.
        let mut exact_paths: Vec<String> = Vec::new();
        let mut regexes: Vec<Result<regex::Regex, regex::Error>> = Vec::new();
        for d in locations {
            let Some(block) = &d.block else { continue };
            let Some((kind, path)) = location_path(d) else {
                if let Some(regex) = location_regex(d) {
                    regexes.push(regex);
                }
                passed_over.push((
                    d,
                    "regular-expression and named locations: splicer matches one WebSocket path",
                ));
                continue;
            };
            if kind == Kind::Exact {
                exact_paths.push(path.clone());
            }
            let mut scope = server.inner();
            let mut pass_directive = None;
            for inner in block.directives() {
                match inner.name.as_str() {
                    "proxy_pass" => pass_directive = Some(inner),
                    "location" => {
                        passed_over.push((inner, "nested locations: splicer matches one WebSocket path"));
                    }
                    _ => self.setting(&mut scope, Module::Http, inner),
                }
            }
            let Some(pass) =
                pass_directive.and_then(|p| self.proxy_pass(Module::Http, p, upstreams, Some(&path)))
            else {
                passed_over.push((
                    d,
                    "no proxy_pass splicer can follow: nginx answered these requests itself",
                ));
                continue;
            };
            let path = match (kind, path.as_str()) {
                (Kind::Prefix | Kind::Priority, "/") => None,
                _ => Some(path),
            };
            found.push((
                WsLocation {
                    path,
                    kind,
                    scope,
                    pass,
                    shadowed: false,
                },
                d,
            ));
        }
        let best = found
            .iter()
            .enumerate()
            .max_by_key(|(i, (w, _))| {
                (
                    w.kind == Kind::Exact,
                    w.path.as_ref().map_or(0, String::len),
                    std::cmp::Reverse(*i),
                )
            })
            .map(|(i, _)| i)?;
        let (mut chosen, _) = found.remove(best);
        let regex_takes = |p: &str| regexes.iter().any(|r| r.as_ref().map_or(true, |r| r.is_match(p)));
        chosen.shadowed = match (&chosen.path, chosen.kind) {
            (Some(p), Kind::Prefix) => exact_paths.contains(p) || regex_takes(p),
            // `^~`: no regular expression is tried after it.
            (Some(p), Kind::Priority) => exact_paths.contains(p),
            _ => false,
        };
        let then = match &chosen.path {
            Some(p) => format!("a splicer listener carries one WebSocket path ({p}): clients asking for these get 404"),
            None => "a splicer listener carries one WebSocket path: these requests now reach `location /`'s upstream".into(),
        };
        for (_, d) in found {
            self.skip(d, then.clone());
        }
        for (d, why) in passed_over {
            self.skip(d, format!("{why}; {then}"));
        }
        Some(chosen)
    }

    /// One listener from a `listen` and everything in force where the
    /// `proxy_pass` is (`server`, and for http the WebSocket location).
    fn listener(
        &mut self,
        m: Module,
        line: usize,
        listen: Listen,
        server: &Scope,
        pass: &Pass,
        ws: Option<&WsLocation>,
    ) -> Converted {
        let protocol = match m {
            Module::Stream => Protocol::Tcp,
            Module::Http => Protocol::Ws,
        };
        let scope = ws.map_or(server, |w| &w.scope);
        // `ssl on;` makes every listen of its level TLS.
        let listen = Listen {
            ssl: listen.ssl || scope.ssl_on,
            ..listen
        };
        let mut draft = Draft::new(String::new(), listen.addr, protocol);
        let mut notes = pass.notes.clone();
        let mut split_realip = false;
        draft.upstream = pass.entries();
        draft.balance = pass.balance;
        draft.connect_timeout = scope.connect_timeout;
        if listen.proxy_protocol {
            draft.accept_proxy = Some(AcceptProxy::Auto);
            draft.proxy_timeout = scope.proxy_protocol_timeout;
        }
        match m {
            Module::Stream => {
                draft.send_proxy = scope.send_proxy.then_some(SendProxy::V1);
                let trusted = scope.trusted.items.clone();
                match (listen.proxy_protocol, trusted.is_empty()) {
                    (true, false) => draft.trusted_proxy = trusted,
                    (true, true) => trust_nobody(&mut draft, &mut notes, scope.trust_reduced),
                    (false, false) => notes.push(
                        "set_real_ip_from without `listen ... proxy_protocol` has nothing to trust; left out"
                            .into(),
                    ),
                    (false, true) => {}
                }
                if !listen.proxy_protocol && !scope.send_proxy {
                    notes.push(
                        "no PROXY header is read or sent: bytes pass as they come, an earlier tier's header included, \
                         as nginx passes them. To check that header instead of passing it blind, set \
                         accept-proxy = \"auto\", trusted-proxy = [the earlier tier] and proxy-passthrough = true"
                            .into(),
                    );
                }
            }
            Module::Http => {
                // nginx resolves the real client before it picks a location,
                // with the server's settings; a location's count only when
                // the server has none.
                let realip = match server.trusted.items.is_empty() {
                    false => server,
                    true => scope,
                };
                split_realip = ws.is_some_and(|w| w.scope.realip_here) && !server.trusted.items.is_empty();
                if split_realip {
                    notes.push(
                        "the location's own real-IP settings are left out: nginx resolved the client with the \
                         server's, and with the location's only when those changed nothing"
                            .into(),
                    );
                }
                self.ws_keys(&mut draft, &mut notes, scope, realip, &listen);
                if let Some(w) = ws {
                    if let (Some(path), false) = (&w.path, w.kind == Kind::Exact) {
                        notes.push(format!(
                            "nginx's `location {path}` also matched longer paths; splicer takes {path} exactly"
                        ));
                    }
                }
                draft.ws_path = Some(ws.and_then(|w| w.path.clone()).unwrap_or_else(|| "*".into()));
            }
        }
        self.access(&mut draft, &mut notes, scope, &listen);
        // What nginx refused in ways splicer cannot follow: admit no one
        // rather than guess, and say why.
        let rules = !draft.allow.is_empty() || !draft.deny.is_empty();
        let realip_reduced = match m {
            Module::Http if !server.trusted.items.is_empty() || server.trust_reduced => server.trust_reduced,
            _ => scope.trust_reduced,
        };
        let refusals = [
            (
                scope.checks,
                "nginx checked requests with `if`, `return`, `rewrite`, `auth_*`, `limit_except` or `internal`",
            ),
            (
                split_realip && rules,
                "allow/deny were checked against a client the location's own real-IP settings might have found",
            ),
            (
                realip_reduced && rules,
                "allow/deny were checked against a client found through trust that could not be translated",
            ),
            (
                listen.v4_mapped && scope.access_mapped,
                "nginx matched IPv4 clients of this ipv6only=off listen against an IPv4-mapped rule left out",
            ),
            (
                ws.is_some_and(|w| w.shadowed),
                "nginx answered this path from another location first (an exact or regular-expression one)",
            ),
        ];
        let why: Vec<&str> = refusals.iter().filter(|(r, _)| *r).map(|(_, why)| *why).collect();
        if !why.is_empty() && draft.deny != everyone() {
            draft.allow.clear();
            draft.deny = everyone();
            notes.push(format!(
                "this listener refuses every client until it is written by hand: {}",
                why.join("; ")
            ));
        }
        self.tls(&mut draft, &mut notes, scope, &listen);
        Converted {
            origin: format!("{} server (line {line}), listen {}", m.name(), listen.addr),
            line,
            notes,
            draft,
        }
    }

    /// The real-IP module and the forwarding headers of a WebSocket
    /// listener: headers from `scope` (the location), the real-IP settings
    /// from `realip`.
    fn ws_keys(
        &mut self,
        draft: &mut Draft,
        notes: &mut Vec<String>,
        scope: &Scope,
        realip: &Scope,
        listen: &Listen,
    ) {
        // nginx's realip module does nothing without set_real_ip_from; with
        // it, real_ip_header defaults to X-Real-IP.
        let trusted = realip.trusted.items.clone();
        let resolving = !trusted.is_empty();
        if resolving {
            let header = realip
                .real_ip_header
                .clone()
                .unwrap_or_else(|| "X-Real-IP".into());
            draft.trusted_proxy = trusted;
            if header == "proxy_protocol" {
                if !listen.proxy_protocol {
                    notes.push("real_ip_header proxy_protocol without `listen ... proxy_protocol`: no header to read".into());
                }
            } else {
                if listen.proxy_protocol {
                    notes.push(format!(
                        "nginx took the client from {header} and left the PROXY header's address aside; \
                         splicer believes a trusted peer's PROXY header first, then reads {header} from there"
                    ));
                }
                draft.real_ip_header = Some(header);
                draft.real_ip_recursive = realip.real_ip_recursive;
            }
        } else if listen.proxy_protocol {
            trust_nobody(draft, notes, realip.trust_reduced);
        }
        let mut forwarded_for = None;
        let mut forwarded_port = None;
        let mut seen = HashSet::new();
        // Forwarding headers set to a value splicer does not translate.
        let mut untranslated = HashSet::new();
        for h in &scope.headers.items {
            let name = h.name.to_ascii_lowercase();
            let value: String = h.value.split_whitespace().collect::<Vec<_>>().join(" ");
            let skip = |w: &mut Walk, why: &str| w.skip_text(h.line, h.text.clone(), why);
            if !seen.insert(name.clone()) {
                // nginx sends each; a broker reading the first may get the
                // client while splicer's one header would say otherwise.
                skip(self, "set more than once: nginx sent each, splicer sends one (overriding X-Forwarded-For/-Port with the client)");
                match name.as_str() {
                    "x-forwarded-for" => forwarded_for = Some(ForwardMode::Override),
                    "x-forwarded-port" => forwarded_port = Some(ForwardMode::Override),
                    _ => {}
                }
                continue;
            }
            match (name.as_str(), value.as_str()) {
                ("upgrade", "$http_upgrade") | ("host", "$host" | "$http_host") => {}
                ("connection", v) if v.eq_ignore_ascii_case("upgrade") || v == "$connection_upgrade" => {}
                ("x-forwarded-for", "$remote_addr") => forwarded_for = Some(ForwardMode::Override),
                ("x-forwarded-for", "$http_x_forwarded_for, $realip_remote_addr") => {
                    forwarded_for = Some(ForwardMode::Append);
                }
                ("x-forwarded-for", "$proxy_add_x_forwarded_for" | "$http_x_forwarded_for, $remote_addr") => {
                    forwarded_for = Some(ForwardMode::Append);
                    if resolving {
                        notes.push(
                            "X-Forwarded-For: nginx appended the client it had resolved ($remote_addr); \
                             splicer appends the peer ($realip_remote_addr), as the guide's LB 3 does"
                                .into(),
                        );
                    }
                }
                ("x-forwarded-port", "$remote_port") => forwarded_port = Some(ForwardMode::Override),
                ("x-forwarded-port", "$http_x_forwarded_port, $realip_remote_port") => {
                    forwarded_port = Some(ForwardMode::Append);
                }
                ("x-forwarded-port", "$http_x_forwarded_port, $remote_port") => {
                    forwarded_port = Some(ForwardMode::Append);
                    if resolving {
                        notes.push(
                            "X-Forwarded-Port: nginx appended the resolved client's port; splicer appends the peer's".into(),
                        );
                    }
                }
                (n, "$remote_addr") if draft.set_real_ip_header.is_none() && carries_client(n) => {
                    draft.set_real_ip_header = Some(h.name.clone());
                }
                ("host", _) => skip(self, "splicer passes the client's Host as it came"),
                ("connection", _) => skip(self, "splicer passes the client's Connection: Upgrade as it came"),
                ("x-forwarded-for" | "x-forwarded-port", _) => {
                    untranslated.insert(name.clone());
                    skip(
                        self,
                        "splicer overrides this header with the client, or appends the peer",
                    );
                }
                _ => skip(
                    self,
                    "splicer sets only X-Forwarded-For, X-Forwarded-Port and one real-IP header",
                ),
            }
        }
        let includes = scope.includes;
        let unset = |mode: &mut Option<ForwardMode>, header: &str, notes: &mut Vec<String>| {
            if mode.is_none() {
                *mode = Some(ForwardMode::Override);
                notes.push(match includes {
                    _ if untranslated.contains(&header.to_ascii_lowercase()) => format!(
                        "{header}'s value here is not translated: splicer overrides it with the client's own"
                    ),
                    false => format!(
                        "nginx passed on whatever {header} the client sent; splicer overrides it with the client's own"
                    ),
                    true => format!(
                        "{header} is not set here (an include may set it; includes are not read): splicer overrides it with the client's own"
                    ),
                });
            }
        };
        unset(&mut forwarded_for, "X-Forwarded-For", notes);
        unset(&mut forwarded_port, "X-Forwarded-Port", notes);
        draft.forwarded_for = forwarded_for;
        draft.forwarded_port = forwarded_port;
    }

    /// `allow`/`deny`. nginx takes the first rule that matches and lets in
    /// the rest; splicer lets in what its allow list names (everyone when
    /// it is empty) unless its deny list names it. The two agree when no
    /// rule is an exception carved out of an earlier one; otherwise the
    /// listener refuses everyone, and says so, rather than guess.
    fn access(&mut self, draft: &mut Draft, notes: &mut Vec<String>, scope: &Scope, listen: &Listen) {
        if !scope.access.own && scope.access.items.is_empty() {
            return;
        }
        // `unix:` rules never match a TCP client.
        let rules: Vec<&AccessRule> = scope.access.items.iter().filter(|r| r.who != Who::Unix).collect();
        let end = rules.iter().position(|r| r.who == Who::All);
        for r in end.map_or(&[][..], |e| &rules[e + 1..]) {
            self.skip_text(
                r.line,
                r.text.clone(),
                "never reached: an earlier `all` rule matches every client",
            );
        }
        let body = &rules[..end.unwrap_or(rules.len())];
        let last = end.map(|e| rules[e].access);
        let nets = |want: Access| -> Vec<(usize, IpNet)> {
            body.iter()
                .enumerate()
                .filter(|(_, r)| r.access == want)
                .filter_map(|(i, r)| match r.who {
                    Who::Net(n) => Some((i, n)),
                    _ => None,
                })
                .collect()
        };
        let (allows, denies) = (nets(Access::Allow), nets(Access::Deny));
        let overlap = |a: &IpNet, b: &IpNet| a.contains(b) || b.contains(a);
        // Where an allow and a deny overlap, nginx follows whichever comes
        // first and splicer the deny: they agree when the deny is first.
        let ordered = allows
            .iter()
            .all(|(ai, a)| denies.iter().all(|(di, d)| !overlap(a, d) || di < ai));
        // With ipv6only=off and no IPv4 rule, nginx matched IPv4 clients
        // against the IPv6 rules; splicer matches them as IPv4.
        let family = |v4: bool| {
            body.iter()
                .any(|r| matches!(r.who, Who::Net(n) if n.addr().is_ipv4() == v4))
        };
        let agrees = ordered && !(listen.v4_mapped && family(false) && !family(true));
        let just = |v: Vec<(usize, IpNet)>| v.into_iter().map(|(_, n)| n).collect::<Vec<_>>();
        match (agrees, last) {
            (true, Some(Access::Deny)) if allows.is_empty() => draft.deny = everyone(),
            (true, Some(Access::Deny)) => {
                draft.allow = just(allows);
                draft.deny = just(denies);
            }
            (true, _) => draft.deny = just(denies),
            (false, _) => {
                for r in &rules[..end.map_or(rules.len(), |e| e + 1)] {
                    self.skip_text(
                        r.line,
                        r.text.clone(),
                        match ordered {
                            true => "nginx matched IPv4 clients of this ipv6only=off listen against IPv6 rules; splicer matches them as IPv4",
                            false => "this order of allow and deny carves exceptions splicer's allow and deny lists cannot",
                        },
                    );
                }
                draft.deny = everyone();
                notes.push("allow/deny not translated: this listener refuses every client until allow and deny are written by hand".into());
            }
        }
    }

    /// `listen ... ssl` with its certificates.
    fn tls(&mut self, draft: &mut Draft, notes: &mut Vec<String>, scope: &Scope, listen: &Listen) {
        if !listen.ssl {
            return;
        }
        draft.tls_cert.clone_from(&scope.certs.items);
        draft.tls_key.clone_from(&scope.keys.items);
        if draft.tls_cert.is_empty() {
            notes.push("`listen ... ssl` with no ssl_certificate: give tls-cert and tls-key".into());
        }
        if draft
            .tls_cert
            .iter()
            .chain(&draft.tls_key)
            .any(|p| p.is_relative())
        {
            notes.push(
                "nginx read relative certificate paths from its prefix (/etc/nginx); splicer reads them from its working directory"
                    .into(),
            );
        }
        if let Some((versions, line, text)) = &scope.protocols {
            let has = |v: &str| versions.iter().any(|x| x == v);
            if has("TLSv1.2") {
                draft.tls_min_version = Some(MinVersion::Tls12);
            } else if has("TLSv1.3") {
                draft.tls_min_version = Some(MinVersion::Tls13);
            }
            if has("TLSv1") || has("TLSv1.1") || has("SSLv3") {
                self.skip_text(*line, text.clone(), "splicer speaks TLS 1.2 and 1.3 only");
            }
        }
        if let Some(auth) = scope.verify_client {
            draft.tls_client_ca.clone_from(&scope.client_ca);
            draft.tls_client_auth = Some(auth);
            notes.push(
                "nginx took only client certificates signed by a CA in ssl_client_certificate itself (ssl_verify_depth 1 \
                 unless raised); splicer also takes chains through intermediates the client sends"
                    .into(),
            );
        }
        draft.tls_handshake_timeout = scope.handshake_timeout;
    }
}

/// How nginx matches a location's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `= /mqtt`: the path alone, before anything else.
    Exact,
    /// `/mqtt`: the longest prefix, unless a regular expression matches.
    Prefix,
    /// `^~ /mqtt`: the longest prefix, and no regular expression after it.
    Priority,
}

/// A location's path and how nginx matches it: `/mqtt`, `= /mqtt`,
/// `=/mqtt`, `^~ /mqtt`. None for regular-expression (`~`, `~*`) and named
/// (`@`) locations, and paths that are not paths.
fn location_path(d: &Directive) -> Option<(Kind, String)> {
    let args: Vec<String> = (0..d.args.len()).filter_map(|i| arg(d, i)).collect();
    let (kind, path) = match args.as_slice() {
        [m, p] if m == "=" => (Kind::Exact, p.as_str()),
        [m, p] if m == "^~" => (Kind::Priority, p.as_str()),
        [p] => match (p.strip_prefix('='), p.strip_prefix("^~")) {
            (Some(rest), _) => (Kind::Exact, rest),
            (_, Some(rest)) => (Kind::Priority, rest),
            _ => (Kind::Prefix, p.as_str()),
        },
        _ => return None,
    };
    path.starts_with('/').then(|| (kind, path.to_string()))
}

/// A regular-expression location's expression (`~`, `~*` for any case),
/// compiled as splicer can: Err when it cannot (nginx's PCRE is not Rust's
/// regex), which is taken as "may match".
fn location_regex(d: &Directive) -> Option<Result<regex::Regex, regex::Error>> {
    let args: Vec<String> = (0..d.args.len()).filter_map(|i| arg(d, i)).collect();
    let (any_case, pattern) = match args.as_slice() {
        [m, p] if m == "~" => (false, p.as_str()),
        [m, p] if m == "~*" => (true, p.as_str()),
        [p] => match (p.strip_prefix("~*"), p.strip_prefix('~')) {
            (Some(rest), _) => (true, rest),
            (_, Some(rest)) => (false, rest),
            _ => return None,
        },
        _ => return None,
    };
    Some(
        regex::RegexBuilder::new(pattern)
            .case_insensitive(any_case)
            .build(),
    )
}

/// Splices pairs of `listen P` and `listen [::]:P` (same parameters) into
/// one dual-stack `[::]:P`; true for those.
fn dual_stack(listens: Vec<Listen>) -> Vec<(Listen, bool)> {
    let mut out: Vec<(Listen, bool)> = Vec::new();
    for l in listens {
        let twin = out.iter_mut().find(|(o, merged)| {
            !merged
                && o.addr.port() == l.addr.port()
                && o.addr.ip().is_unspecified()
                && l.addr.ip().is_unspecified()
                && o.addr.is_ipv4() != l.addr.is_ipv4()
                && (o.proxy_protocol, o.ssl) == (l.proxy_protocol, l.ssl)
        });
        match twin {
            Some((o, merged)) => {
                o.addr = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), l.addr.port());
                o.default |= l.default;
                *merged = true;
            }
            None => out.push((l, false)),
        }
    }
    out
}

/// A PROXY header read and no one believed: nginx's without any
/// set_real_ip_from, or the conversion's when it could not read one.
/// splicer reads headers only with a trusted list, so the list names an
/// address no peer has.
fn trust_nobody(draft: &mut Draft, notes: &mut Vec<String>, reduced: bool) {
    draft.trusted_proxy = vec![IpNet::from(IpAddr::V4(Ipv4Addr::UNSPECIFIED))];
    notes.push(match reduced {
        false => "no set_real_ip_from: nginx read the PROXY header and believed no one, and the broker was told \
                  the peer's address. trusted-proxy = [\"0.0.0.0/32\"] names no peer, to do the same; put the tier \
                  in front there"
            .into(),
        true => "set_real_ip_from could not be translated: the PROXY header is read and believed from no one \
                 (trusted-proxy = [\"0.0.0.0/32\"] names no peer) until the trusted tier is written there"
            .into(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};

    /// Converts `text`, checks the TOML it writes is a config splicer
    /// takes (TLS aside: its files do not exist here), and returns it.
    fn converted(text: &str) -> Conversion {
        let c = convert(text).unwrap();
        if !c.listeners.is_empty() && c.listeners.iter().all(|l| l.draft.tls_cert.is_empty()) {
            let toml = c.to_toml("test.conf").unwrap();
            if let Err(e) = Config::from_toml(&toml, "converted", &Overrides::default()) {
                panic!("{e:#}\n{toml}");
            }
        }
        c
    }

    fn one(text: &str) -> (Draft, Vec<String>, Vec<Skipped>) {
        let c = converted(text);
        assert_eq!(c.listeners.len(), 1, "{c:#?}");
        let l = c.listeners.into_iter().next().unwrap();
        (l.draft, l.notes, c.skipped)
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn times() {
        let t = |s: &str| nginx_time(s).map(|d| d.0);
        assert_eq!(t("5"), Some(Duration::from_secs(5)));
        assert_eq!(t("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(t("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(t("1m 30s"), Some(Duration::from_secs(90)));
        assert_eq!(t("2h"), Some(Duration::from_hours(2)));
        assert_eq!(t("1d"), Some(Duration::from_hours(24)));
        // nginx wants larger units first, each once.
        assert_eq!(t("30s1m"), None);
        assert_eq!(t("1s1s"), None);
        assert_eq!(t("1x"), None);
        assert_eq!(t("s"), None);
        assert_eq!(t(""), None);
    }

    #[test]
    fn addresses() {
        assert_eq!(listen_addr("1883"), Some("0.0.0.0:1883".parse().unwrap()));
        assert_eq!(listen_addr("*:8083"), Some("0.0.0.0:8083".parse().unwrap()));
        assert_eq!(listen_addr("[::]:1883"), Some("[::]:1883".parse().unwrap()));
        assert_eq!(listen_addr("10.0.0.1"), Some("10.0.0.1:80".parse().unwrap()));
        assert_eq!(listen_addr("unix:/run/x.sock"), None);
        assert_eq!(
            upstream_addr("emqx-0.emqx:1883", None).as_deref(),
            Some("emqx-0.emqx:1883")
        );
        assert_eq!(upstream_addr("emqx", Some(80)).as_deref(), Some("emqx:80"));
        assert_eq!(upstream_addr("10.0.0.1", None), None);
        assert_eq!(upstream_addr("unix:/x", None), None);
        assert_eq!(upstream_addr("1.2.3:99", None), None);
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let deep = |n: usize| format!("{}{}", "http {\n".repeat(n), "}".repeat(n));
        let e = convert(&deep(5000)).unwrap_err();
        assert!(format!("{e}").contains("at line 65"), "{e}");
        assert!(convert(&deep(MAX_DEPTH)).is_ok());
        // A `#` inside a word starts no comment, for nginx and the parser.
        let hidden = format!("{}{}", "x a#{\n".repeat(5000), "}".repeat(5000));
        assert!(convert(&hidden).is_err());
        // Braces in quotes and comments are not nesting.
        let text = format!(
            "# {}\nhttp {{ add_header X \"{}\"; }}",
            "{".repeat(100),
            "{".repeat(100)
        );
        assert!(convert(&text).is_ok());
    }

    #[test]
    fn stream_non_passthrough_lb2() {
        let (d, notes, skipped) = one("stream {
               upstream server { server 172.16.0.71:1883; }
               server {
                 listen 1883 proxy_protocol;
                 proxy_pass server;
                 proxy_protocol on;
                 set_real_ip_from 172.16.0.0/24;
               }
             }");
        assert_eq!(d.listen, "0.0.0.0:1883".parse().unwrap());
        assert_eq!(d.protocol, Protocol::Tcp);
        assert_eq!(d.upstream, ["172.16.0.71:1883"]);
        assert_eq!(d.accept_proxy, Some(AcceptProxy::Auto));
        assert_eq!(d.send_proxy, Some(SendProxy::V1));
        assert_eq!(d.trusted_proxy, [net("172.16.0.0/24")]);
        assert!(notes.is_empty(), "{notes:?}");
        assert!(skipped.is_empty(), "{skipped:?}");
    }

    #[test]
    fn a_proxy_header_from_nobody_trusted_is_read_and_not_believed() {
        for text in [
            "stream { server { listen 1883 proxy_protocol; proxy_pass 10.0.0.1:1883; proxy_protocol on; } }",
            "http { server { listen 80 proxy_protocol; location /mqtt { proxy_pass http://10.0.0.1:8083; } } }",
        ] {
            let (d, notes, _) = one(text);
            assert_eq!(d.accept_proxy, Some(AcceptProxy::Auto));
            assert_eq!(d.trusted_proxy, [net("0.0.0.0/32")]);
            assert!(notes.iter().any(|n| n.contains("believed no one")), "{notes:?}");
        }
    }

    #[test]
    fn stream_blind_passthrough_says_so() {
        let (d, notes, _) = one("stream { server { listen 1883; proxy_pass 172.16.0.71:1883; } }");
        assert_eq!((d.accept_proxy, d.send_proxy), (None, None));
        assert!(notes.iter().any(|n| n.contains("proxy-passthrough")), "{notes:?}");
    }

    #[test]
    fn websocket_method_2_lb3() {
        let (d, notes, skipped) = one(r#"http {
              upstream server { server 172.16.0.71:8083; }
              server {
                listen 8083;
                set_real_ip_from 172.16.0.0/24;
                real_ip_header X-Forwarded-For;
                real_ip_recursive on;
                location /mqtt {
                  proxy_pass http://server;
                  proxy_http_version 1.1;
                  proxy_set_header Upgrade $http_upgrade;
                  proxy_set_header Connection "Upgrade";
                  proxy_set_header Host $host;
                  proxy_set_header X-Forwarded-For "$http_x_forwarded_for, $realip_remote_addr";
                  proxy_set_header X-Forwarded-Port "$http_x_forwarded_port, $realip_remote_port";
                  proxy_set_header X-Real-IP $remote_addr;
                }
              }
            }"#);
        assert_eq!(d.protocol, Protocol::Ws);
        assert_eq!(d.ws_path.as_deref(), Some("/mqtt"));
        assert_eq!(d.trusted_proxy, [net("172.16.0.0/24")]);
        assert_eq!(d.real_ip_header.as_deref(), Some("X-Forwarded-For"));
        assert!(d.real_ip_recursive);
        assert_eq!(d.forwarded_for, Some(ForwardMode::Append));
        assert_eq!(d.forwarded_port, Some(ForwardMode::Append));
        assert_eq!(d.set_real_ip_header.as_deref(), Some("X-Real-IP"));
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(notes.len(), 1, "only the path note: {notes:?}");
    }

    #[test]
    fn websocket_without_forwarding_headers_is_overridden_and_said() {
        let (d, notes, _) = one("http { server { listen 80; location / { proxy_pass http://b:8083; } } }");
        assert_eq!(d.ws_path.as_deref(), Some("*"));
        assert_eq!(d.upstream, ["b:8083"]);
        assert_eq!(d.forwarded_for, Some(ForwardMode::Override));
        assert_eq!(
            notes.iter().filter(|n| n.contains("passed on whatever")).count(),
            2,
            "{notes:?}"
        );
        // Behind an include, nginx may have set them: said differently.
        let (_, notes, _) = one(
            "http { server { listen 80; location / { include proxy_params; proxy_pass http://b:8083; } } }",
        );
        assert_eq!(
            notes
                .iter()
                .filter(|n| n.contains("an include may set it"))
                .count(),
            2,
            "{notes:?}"
        );
    }

    #[test]
    fn a_forwarding_header_set_twice_is_overridden() {
        let (d, _, skipped) = one(
            "http { server { listen 80; location /mqtt { proxy_pass http://b:8083;
               proxy_set_header X-Forwarded-For $remote_addr;
               proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; } } }",
        );
        assert_eq!(d.forwarded_for, Some(ForwardMode::Override));
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(
            skipped[0].text.contains("$proxy_add_x_forwarded_for"),
            "{skipped:?}"
        );
    }

    #[test]
    fn http_realip_defaults_and_server_level_first() {
        let (d, _, _) = one(
            "http { set_real_ip_from 10.0.0.0/8; server { listen 80; location /mqtt { proxy_pass http://10.0.0.1:8083; } } }",
        );
        assert_eq!(d.real_ip_header.as_deref(), Some("X-Real-IP"));
        assert!(!d.real_ip_recursive);
        // nginx resolves with the server's settings before any location's.
        let (d, notes, _) = one(
            "http { server { listen 80; set_real_ip_from 127.0.0.1;
               location /mqtt { set_real_ip_from 10.0.0.0/8; real_ip_header X-Forwarded-For; proxy_pass http://10.0.0.1:8083; } } }",
        );
        assert_eq!(d.trusted_proxy, [net("127.0.0.1/32")]);
        assert_eq!(d.real_ip_header.as_deref(), Some("X-Real-IP"));
        assert!(
            notes.iter().any(|n| n.contains("location's own real-IP")),
            "{notes:?}"
        );
        // With none at the server, the location's count.
        let (d, _, _) = one(
            "http { server { listen 80; location /mqtt { set_real_ip_from 10.0.0.0/8; proxy_pass http://10.0.0.1:8083; } } }",
        );
        assert_eq!(d.trusted_proxy, [net("10.0.0.0/8")]);
    }

    #[test]
    fn inner_lists_replace_outer_ones() {
        let (d, _, _) = one(
            "stream { set_real_ip_from 10.0.0.0/8; set_real_ip_from 10.1.0.0/16;
               server { listen 1 proxy_protocol; set_real_ip_from 192.168.0.1; proxy_pass 10.0.0.1:1; } }",
        );
        assert_eq!(d.trusted_proxy, [net("192.168.0.1/32")]);
        let (d, _, _) = one(
            "stream { set_real_ip_from 10.0.0.0/8; server { listen 1 proxy_protocol; proxy_pass 10.0.0.1:1; } }",
        );
        assert_eq!(d.trusted_proxy, [net("10.0.0.0/8")]);
        // One splicer cannot follow still replaces the outer list: trust
        // less, never more.
        let (d, _, skipped) = one("stream { set_real_ip_from 10.0.0.0/8;
               server { listen 1 proxy_protocol; set_real_ip_from lb1.internal; proxy_pass 10.0.0.1:1; } }");
        assert_eq!(d.trusted_proxy, [net("0.0.0.0/32")]);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
    }

    #[test]
    fn upstream_details() {
        let c = converted(
            "stream {
               server { listen 1883; proxy_pass Brokers; proxy_connect_timeout 3s; }
               upstream brokers {
                 least_conn;
                 server 10.0.0.1:1883 weight=3 max_fails=2;
                 server emqx-1.emqx:1883;
                 server 10.0.0.3:1883 down weight=3;
                 server 10.0.0.4:1883 backup;
                 server 10.0.0.5:1883 weight=1000;
               }
             }",
        );
        let d = &c.listeners[0].draft;
        assert_eq!(
            d.upstream,
            [
                "10.0.0.1:1883 weight=3",
                "emqx-1.emqx:1883",
                "10.0.0.3:1883 weight=0",
                "10.0.0.5:1883 weight=256"
            ]
        );
        assert_eq!(d.balance, Some(Balance::LeastConn));
        assert_eq!(d.connect_timeout, Some(Dur(Duration::from_secs(3))));
        let lines: Vec<usize> = c.skipped.iter().map(|s| s.line).collect();
        assert_eq!(lines, [5, 8, 9], "{:#?}", c.skipped);
        // Only servers splicer cannot use: no listener, and said why.
        let c = converted(
            "stream { server { listen 1; proxy_pass b; } upstream b { server 10.0.0.1:1 backup; } }",
        );
        assert!(c.listeners.is_empty());
        assert!(
            c.skipped.iter().any(|s| s.why.contains("no upstream")),
            "{:#?}",
            c.skipped
        );
        // A zero timeout is named, not written.
        let (d, _, skipped) =
            one("stream { server { listen 1; proxy_pass 10.0.0.1:1; proxy_connect_timeout 0; } }");
        assert_eq!((d.connect_timeout, skipped.len()), (None, 1));
    }

    #[test]
    fn http_proxy_pass_forms() {
        let (d, notes, _) = one("http { upstream Backend { server 10.0.0.1:8083; }
               server { listen 80; location /mqtt { proxy_pass HTTP://backend/; } } }");
        assert_eq!(d.upstream, ["10.0.0.1:8083"]);
        assert!(
            notes
                .iter()
                .any(|n| n.contains("replaced the location's /mqtt with /")),
            "{notes:?}"
        );
        let c = converted("http { server { listen 80; location /mqtt { proxy_pass https://10.0.0.1; } } }");
        assert!(c.listeners.is_empty());
    }

    #[test]
    fn the_most_specific_location_is_the_websocket_path() {
        let (d, _, skipped) = one("http { server { listen 80;
               location / { proxy_pass http://10.0.0.1:80; }
               location /mqtt { proxy_pass http://10.0.0.2:8083; } } }");
        assert_eq!(
            (d.ws_path.as_deref(), d.upstream.as_slice()),
            (Some("/mqtt"), &["10.0.0.2:8083".to_string()][..])
        );
        assert_eq!(skipped.len(), 1);
        assert!(
            skipped[0].text.starts_with("location / ") && skipped[0].why.contains("404"),
            "{skipped:?}"
        );
        let (d, notes, _) =
            one("http { server { listen 80; location = / { proxy_pass http://10.0.0.1:80; } } }");
        assert_eq!(d.ws_path.as_deref(), Some("/"));
        assert!(!notes.iter().any(|n| n.contains("longer paths")), "{notes:?}");
    }

    #[test]
    fn listens_splicer_could_not_bind_together() {
        // Both families of one server: one dual-stack listener.
        let (d, notes, _) =
            one("stream { server { listen 1883; listen [::]:1883; proxy_pass 10.0.0.1:1883; } }");
        assert_eq!(d.listen, "[::]:1883".parse().unwrap());
        assert!(notes.iter().any(|n| n.contains("dual-stack")), "{notes:?}");
        let servers = |listens: &[&str]| {
            let body: String = listens
                .iter()
                .enumerate()
                .map(|(i, l)| format!("server {{ listen {l}; proxy_pass 10.0.0.{}:1; }} ", i + 1))
                .collect();
            let c = converted(&format!("stream {{ {body} }}"));
            let kept: Vec<(String, String, String)> = c
                .listeners
                .iter()
                .map(|l| {
                    (
                        l.draft.name.clone(),
                        l.draft.listen.to_string(),
                        l.draft.upstream[0].clone(),
                    )
                })
                .collect();
            (kept, c.skipped.len())
        };
        let k = |name: &str, addr: &str, up: &str| (name.to_string(), addr.to_string(), up.to_string());
        // nginx sends clients of 10.0.0.9 to the second server and the rest
        // to the first: splicer keeps the narrower, whatever the order or
        // default_server, and serves no one else on that port.
        assert_eq!(
            servers(&["1883", "10.0.0.9:1883"]),
            (vec![k("stream-1883", "10.0.0.9:1883", "10.0.0.2:1")], 1)
        );
        assert_eq!(
            servers(&["10.0.0.8:1883", "10.0.0.9:1883", "1883 default_server"]),
            (
                vec![
                    k("stream-1883", "10.0.0.8:1883", "10.0.0.1:1"),
                    k("stream-1883-2", "10.0.0.9:1883", "10.0.0.2:1")
                ],
                1
            )
        );
        // [::] beside 0.0.0.0 on one port (two servers): the IPv4 one.
        assert_eq!(
            servers(&["[::]:1883", "1883"]),
            (vec![k("stream-1883", "0.0.0.0:1883", "10.0.0.2:1")], 1)
        );
        // One address, two servers: nginx chose by name; the default_server, else the first.
        assert_eq!(
            servers(&["1883", "1883"]),
            (vec![k("stream-1883", "0.0.0.0:1883", "10.0.0.1:1")], 1)
        );
        assert_eq!(
            servers(&["1883", "1883 default_server"]),
            (vec![k("stream-1883", "0.0.0.0:1883", "10.0.0.2:1")], 1)
        );
        // Other ports and families stay.
        assert_eq!(servers(&["1883", "[::1]:1883", "1884"]).0.len(), 3);
    }

    #[test]
    fn ipv4_mapped_ranges_are_left_out() {
        let (d, _, skipped) = one(
            "http { server { listen 80; set_real_ip_from ::ffff:127.0.0.0/104;
               location /mqtt { proxy_pass http://10.0.0.1:8083; proxy_set_header X-Real-IP $remote_addr; } } }",
        );
        assert!(d.trusted_proxy.is_empty() && d.real_ip_header.is_none(), "{d:?}");
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        let (d, _, _) = one(
            "stream { server { listen 1; proxy_pass 10.0.0.1:1; allow ::ffff:127.0.0.0/104; deny all; } }",
        );
        assert_eq!((d.allow.len(), d.deny.clone()), (0, everyone()));
        // ipv6only=off: nginx matched IPv4 clients against IPv6 rules.
        let (d, notes, _) =
            one("stream { server { listen [::]:1 ipv6only=off; proxy_pass 10.0.0.1:1; deny ::/0; } }");
        assert_eq!(d.deny, everyone());
        assert!(
            notes.iter().any(|n| n.contains("refuses every client")),
            "{notes:?}"
        );
    }

    #[test]
    fn checks_splicer_cannot_follow_refuse_everyone() {
        // The client the rules saw came from the server's real-IP settings,
        // or the location's when those changed nothing.
        let (d, notes, _) = one(
            "http { server { listen 80; set_real_ip_from 127.0.0.0/8; real_ip_header X-Real-IP;
               location / { real_ip_header X-Forwarded-For; deny 203.0.113.0/24; proxy_pass http://10.0.0.1:8083; } } }",
        );
        assert_eq!(d.deny, everyone());
        assert!(notes.iter().any(|n| n.contains("might have found")), "{notes:?}");
        let (d, _, _) = one(
            "http { server { listen 80; location / { if ($arg_x) { return 403; } proxy_pass http://10.0.0.1:8083; } } }",
        );
        assert_eq!(d.deny, everyone());
        // Paths nginx answered itself beside `location /` are named as
        // reaching the upstream now.
        let (_, _, skipped) = one(
            "http { server { listen 80; location /admin { return 403; } location / { proxy_pass http://10.0.0.1:8083; } } }",
        );
        assert!(
            skipped
                .iter()
                .any(|s| s.text.starts_with("location /admin") && s.why.contains("now reach")),
            "{skipped:?}"
        );
    }

    #[test]
    fn what_nginx_refused_stays_refused() {
        let refused = |text: &str| {
            let c = converted(text);
            assert_eq!(c.listeners.len(), 1, "{c:#?}");
            let l = &c.listeners[0];
            assert_eq!(l.draft.deny, everyone(), "{text}\n{:#?}", l.notes);
            assert!(
                l.notes.iter().any(|n| n.contains("refuses every client")),
                "{:#?}",
                l.notes
            );
        };
        let ws = |server: &str, location: &str| {
            format!("http {{ server {{ listen 80; {server} location /mqtt {{ {location} proxy_pass http://10.0.0.1:8083; }} }} }}")
        };
        // `return` and `rewrite` run before the proxying.
        refused(&ws("return 403;", ""));
        refused(&ws("", "rewrite ^ /x break;"));
        // Another location answers the path first: exact, or a matching
        // (or unreadable) regular expression.
        refused(&ws("location = /mqtt { return 403; }", ""));
        refused(&ws(
            "location ~ ^/mqtt$ { deny all; proxy_pass http://10.0.0.2:1; }",
            "",
        ));
        refused(&ws("location ~ (?<=x)mqtt { deny all; }", ""));
        let (d, _, _) = one(&ws("location ~* \\.png$ { deny all; }", ""));
        assert!(d.deny.is_empty());
        let (d, _, _) = one(
            "http { server { listen 80; location ~ mqtt { deny all; } location ^~ /mqtt { proxy_pass http://10.0.0.1:8083; } } }",
        );
        assert!(d.deny.is_empty(), "^~ stops the regular expressions");
        // Trust that could not be read, where allow/deny depend on it.
        refused(&ws(
            "set_real_ip_from lb.internal; real_ip_header X-Forwarded-For; allow 10.0.0.0/8; deny all;",
            "",
        ));
        refused(
            "stream { server { listen 1 proxy_protocol; set_real_ip_from lb.internal; allow 10.0.0.0/8; deny all; proxy_pass 10.0.0.1:1; } }",
        );
        // ipv6only=off, an IPv4-mapped deny left out.
        refused("stream { server { listen [::]:1 ipv6only=off; deny ::ffff:127.0.0.0/104; proxy_pass 10.0.0.1:1; } }");
        // Without rules, less trust is all it takes.
        let (d, notes, _) = one("stream { server { listen 1 proxy_protocol; set_real_ip_from lb.internal; proxy_pass 10.0.0.1:1; } }");
        assert!(
            d.deny.is_empty() && notes.iter().any(|n| n.contains("could not be translated")),
            "{notes:?}"
        );
    }

    #[test]
    fn servers_sharing_an_address_share_its_socket_options() {
        // nginx made 8883 TLS for both servers: neither is translated alone.
        let c = converted(
            "http { server { listen 8883; location /mqtt { proxy_pass http://10.0.0.1:1; } }
               server { listen 8883 ssl; ssl_certificate a.pem; ssl_certificate_key a.key; location /mqtt { proxy_pass http://10.0.0.2:1; } } }",
        );
        assert!(c.listeners.is_empty(), "{c:#?}");
        // IPv4 clients went only to the server with `listen 8083`.
        let c = converted(
            "stream { server { listen 8083; listen [::]:8083; allow 10.0.0.0/8; deny all; proxy_pass 10.0.0.1:1; }
               server { listen [::]:8083 default_server; proxy_pass 10.0.0.2:1; } }",
        );
        assert!(c.listeners.is_empty(), "{c:#?}");
        // `ssl on;` makes a listen TLS.
        let c = convert(
            "http { server { listen 8883; ssl on; ssl_certificate a.pem; ssl_certificate_key a.key; location /mqtt { proxy_pass http://10.0.0.1:1; } } }",
        )
        .unwrap();
        assert_eq!(c.listeners[0].draft.tls_cert, [PathBuf::from("a.pem")]);
    }

    #[test]
    fn outputs_splicer_takes() {
        // A server listed twice counts twice; all down is nothing to forward to.
        let (d, _, _) = one("stream { server { listen 1; proxy_pass b; } upstream b { server 10.0.0.1:1; server 10.0.0.1:1; } }");
        assert_eq!(d.upstream, ["10.0.0.1:1 weight=2"]);
        let (d, _, _) = one("stream { server { listen 1; proxy_pass b; } upstream b { server b.example:1; server B.example:1; } }");
        assert_eq!(d.upstream, ["b.example:1 weight=2"]);
        let (_, notes, _) = one(
            "http { server { listen 80; location /mqtt { proxy_pass http://10.0.0.1:1; proxy_set_header X-Forwarded-For \"\"; } } }",
        );
        assert!(
            notes
                .iter()
                .any(|n| n.contains("X-Forwarded-For's value here is not translated")),
            "{notes:?}"
        );
        let c =
            converted("stream { server { listen 1; proxy_pass b; } upstream b { server 10.0.0.1:1 down; } }");
        assert!(
            c.listeners.is_empty() && c.skipped.iter().any(|s| s.why.contains("down")),
            "{c:#?}"
        );
        // Location modifiers written against the path.
        let (d, _, _) =
            one("http { server { listen 80; location =/mqtt { proxy_pass http://10.0.0.1:8083; } } }");
        assert_eq!(d.ws_path.as_deref(), Some("/mqtt"));
        assert!(converted(
            "http { server { listen 80; location mqtt { proxy_pass http://10.0.0.1:8083; } } }"
        )
        .listeners
        .is_empty());
        // Only real header names, and none the upgrade needs, carry the client.
        for header in ["\"X Bad\"", "Upgrade", "X-Forwarded-Port", "Sec-WebSocket-Key"] {
            let (d, _, skipped) = one(&format!(
                "http {{ server {{ listen 80; location /mqtt {{ proxy_pass http://10.0.0.1:8083; proxy_set_header {header} $remote_addr; }} }} }}"
            ));
            assert_eq!((d.set_real_ip_header, skipped.len()), (None, 1), "{header}");
        }
    }

    #[test]
    fn access_rules() {
        let everyone = everyone();
        let access = |rules: &str| {
            let c = converted(&format!(
                "stream {{ server {{ listen 1; proxy_pass 10.0.0.1:1; {rules} }} }}"
            ));
            let d = &c.listeners[0].draft;
            (d.allow.clone(), d.deny.clone(), c.skipped.len())
        };
        let n = |s: &[&str]| s.iter().map(|s| net(s)).collect::<Vec<_>>();
        assert_eq!(
            access("allow 10.0.0.0/8; allow 10.1.1.1; deny all;"),
            (n(&["10.0.0.0/8", "10.1.1.1/32"]), vec![], 0)
        );
        assert_eq!(
            access("deny 10.0.0.0/8; allow all;"),
            (vec![], n(&["10.0.0.0/8"]), 0)
        );
        assert_eq!(access("deny 10.0.0.0/8;"), (vec![], n(&["10.0.0.0/8"]), 0));
        assert_eq!(access("allow 10.0.0.0/8;"), (vec![], vec![], 0));
        assert_eq!(
            access("deny 6.6.6.6; allow 10.0.0.0/8;"),
            (vec![], n(&["6.6.6.6/32"]), 0)
        );
        // A deny before an overlapping allow wins in both.
        assert_eq!(
            access("deny 10.1.0.0/16; allow 10.0.0.0/8; deny all;"),
            (n(&["10.0.0.0/8"]), n(&["10.1.0.0/16"]), 0)
        );
        // `deny all` alone refuses everyone.
        assert_eq!(access("deny all;"), (vec![], everyone.clone(), 0));
        assert_eq!(access("allow unix:; deny all;"), (vec![], everyone.clone(), 0));
        // Rules after an `all` are never reached.
        assert_eq!(
            access("deny all; allow 10.0.0.0/8;"),
            (vec![], everyone.clone(), 1)
        );
        // An allow carved out of a later deny: nginx lets 10.1.x in, splicer
        // cannot say so, and refuses everyone rather than guess.
        assert_eq!(
            access("allow 10.1.0.0/16; deny 10.0.0.0/8; allow all;"),
            (vec![], everyone.clone(), 3)
        );
        assert_eq!(
            access("allow 10.0.0.0/8; deny 10.1.0.0/16; deny all;"),
            (vec![], everyone.clone(), 3)
        );
        assert_eq!(
            access("allow 10.0.0.0/8; deny 10.1.0.0/16;"),
            (vec![], everyone.clone(), 2)
        );
        // An inherited `deny all` holds; a server's own rules replace it.
        let c = converted("stream { deny all; server { listen 1; proxy_pass 10.0.0.1:1; } }");
        assert_eq!(c.listeners[0].draft.deny, everyone);
        let c = converted("stream { deny all; server { listen 1; proxy_pass 10.0.0.1:1; allow unix:; } }");
        assert!(c.listeners[0].draft.deny.is_empty());
    }

    #[test]
    fn tls_listener() {
        let (d, notes, skipped) = one("stream { server { listen 8883 ssl; proxy_pass 10.0.0.1:1883;
               ssl_certificate /etc/x/a.pem; ssl_certificate_key /etc/x/a.key;
               ssl_protocols TLSv1.1 TLSv1.2 TLSv1.3; ssl_ciphers HIGH;
               ssl_client_certificate /etc/x/ca.pem; ssl_verify_client optional; } }");
        assert_eq!(d.tls_cert, [PathBuf::from("/etc/x/a.pem")]);
        assert_eq!(d.tls_key, [PathBuf::from("/etc/x/a.key")]);
        assert_eq!(d.tls_min_version, Some(MinVersion::Tls12));
        assert_eq!(d.tls_client_ca, Some(PathBuf::from("/etc/x/ca.pem")));
        assert_eq!(d.tls_client_auth, Some(ClientAuth::Optional));
        assert_eq!(skipped.len(), 2, "TLSv1.1 and ssl_ciphers: {skipped:#?}");
        assert!(notes.iter().any(|n| n.contains("intermediates")), "{notes:?}");
    }

    #[test]
    fn everything_else_is_named_with_its_line() {
        let c = converted(
            "worker_processes auto;\nevents { worker_connections 1024; }\nhttp {\n  include mime.types;\n  server {\n    listen 80;\n    server_name x;\n    location /mqtt { proxy_pass http://10.0.0.1:8083; proxy_set_header X-Forwarded-Proto $scheme; }\n    location /static { root /srv; }\n  }\n}\n",
        );
        let got: Vec<(usize, &str)> = c.skipped.iter().map(|s| (s.line, s.text.as_str())).collect();
        assert_eq!(
            got,
            [
                (1, "worker_processes auto"),
                (2, "events { ... }"),
                (4, "include mime.types"),
                (7, "server_name x"),
                (9, "root /srv"),
                (9, "location /static { ... }"),
                (8, "proxy_set_header X-Forwarded-Proto $scheme"),
            ]
        );
    }

    #[test]
    fn control_characters_stay_inside_comments() {
        let c = converted("stream { server { listen 1; proxy_pass 10.0.0.1:1; foo \"a\u{1}b\rc\"; } }");
        let toml = c.to_toml("x\u{7f}.conf").unwrap();
        assert!(toml.contains("\\u{1}"), "{toml}");
        toml.parse::<toml::Table>().unwrap();
    }

    #[test]
    fn nothing_to_convert_and_bad_syntax() {
        assert!(convert("stream { server { listen 1; } }")
            .unwrap()
            .listeners
            .is_empty());
        let e = convert("stream { server { listen 1 }").unwrap_err();
        assert!(format!("{e}").contains("line"), "{e}");
    }
}
