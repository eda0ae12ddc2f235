//! nginx's side of `convert-nginx`: the config parsed by nginx-lint-parser,
//! then walked the way nginx reads it. `upstream` blocks are collected
//! first (nginx lets `proxy_pass` name one defined later); settings flow
//! down from `stream`/`http` to `server` to `location`, an inner level's
//! list directives (`set_real_ip_from`, `proxy_set_header`, `allow`/`deny`,
//! `ssl_certificate`) replacing the outer level's as nginx does; every
//! `listen` of a server with a `proxy_pass` becomes one listener.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{bail, Result};
use ipnet::IpNet;
use nginx_lint_parser::ast::{ArgumentValue, Block, Directive};

use super::{Conversion, Converted, Draft, Skipped};
use crate::config::{AcceptProxy, Balance, ClientAuth, Dur, ForwardMode, MinVersion, Protocol, SendProxy};

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
/// `http { }` blocks alone).
pub fn convert(text: &str) -> Result<Conversion> {
    // The parser recurses once per level (and overflows the stack a few
    // thousand levels down); real configs nest a handful.
    if let Some(line) = too_deep(text) {
        bail!("blocks nested more than {MAX_DEPTH} deep at line {line}");
    }
    let config = match nginx_lint_parser::parse_string(text) {
        Ok(c) => c,
        Err(e) => bail!("not an nginx config nginx would read: {e}"),
    };
    let mut walk = Walk::default();
    for d in config.directives() {
        match (d.name.as_str(), &d.block) {
            ("stream", Some(b)) => walk.module(Module::Stream, b),
            ("http", Some(b)) => walk.module(Module::Http, b),
            ("server" | "upstream", _) => walk.skip(
                d,
                "outside a stream or http block: wrap it in the one it belongs to",
            ),
            _ => walk.skip_unknown(d),
        }
    }
    Ok(Conversion {
        listeners: walk.listeners,
        skipped: walk.skipped,
    })
}

const MAX_DEPTH: usize = 64;

/// The line where `{` nesting passes MAX_DEPTH, if it does; braces in
/// quotes and comments do not count.
fn too_deep(text: &str) -> Option<usize> {
    let (mut depth, mut line) = (0usize, 1);
    let mut quote: Option<char> = None;
    let mut comment = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (c, quote) {
            ('\n', _) => {
                line += 1;
                comment = false;
                continue;
            }
            _ if comment => {}
            ('\\', Some(_)) => {
                chars.next();
            }
            (c, Some(q)) if c == q => quote = None,
            (_, Some(_)) => {}
            ('"' | '\'', None) => quote = Some(c),
            ('#', None) => comment = true,
            ('{', None) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Some(line);
                }
            }
            ('}', None) => depth = depth.saturating_sub(1),
            _ => {}
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
        if !self.own {
            self.items.clear();
            self.own = true;
        }
        self.items.push(item);
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

/// An `allow`/`deny` rule; None is `all`.
#[derive(Debug, Clone)]
struct AccessRule {
    access: Access,
    net: Option<IpNet>,
    line: usize,
    text: String,
}

/// What servers and locations inherit from the levels around them.
#[derive(Debug, Clone, Default)]
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
    /// `ssl_protocols`, as written.
    protocols: Option<(Vec<String>, usize, String)>,
    client_ca: Option<PathBuf>,
    verify_client: Option<ClientAuth>,
    handshake_timeout: Option<Dur>,
}

impl Scope {
    fn inner(&self) -> Scope {
        Scope {
            trusted: self.trusted.inner(),
            headers: self.headers.inner(),
            access: self.access.inner(),
            certs: self.certs.inner(),
            keys: self.keys.inner(),
            ..self.clone()
        }
    }
}

/// A `listen` as far as splicer can follow it.
#[derive(Debug, Clone, Copy)]
struct Listen {
    addr: SocketAddr,
    proxy_protocol: bool,
    ssl: bool,
}

/// Where `proxy_pass` sends clients.
#[derive(Debug, Clone, Default)]
struct Pass {
    upstream: Vec<String>,
    balance: Option<Balance>,
    notes: Vec<String>,
}

/// The chosen WebSocket location of an http server.
struct WsLocation {
    /// `location = PATH`: nginx too matched the path alone.
    exact: bool,
    /// None: `location /`, any path.
    path: Option<String>,
    scope: Scope,
    pass: Pass,
}

#[derive(Default)]
struct Walk {
    listeners: Vec<Converted>,
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

/// nginx's time syntax: `5`, `5s`, `500ms`, `1m30s`, `1h`, `2d`.
fn nginx_time(s: &str) -> Option<Dur> {
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Dur(Duration::from_secs(secs)));
    }
    if s.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_mins(1),
            "h" => Duration::from_hours(1),
            "d" => Duration::from_hours(24),
            "w" => Duration::from_hours(168),
            _ => return None,
        };
        total += unit.checked_mul(u32::try_from(n).ok()?)?;
        rest = &rest[unit_len..];
    }
    Some(Dur(total))
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
        "include" => "included files are not followed: convert each one too",
        "resolver" | "resolver_timeout" => "upstream names are resolved with the resolv-conf file (resolv-conf, resolve-interval)",
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
        "ssl_ciphers" | "ssl_prefer_server_ciphers" | "ssl_session_cache" | "ssl_session_timeout"
        | "ssl_session_tickets" | "ssl_session_ticket_key" | "ssl_ecdh_curve" | "ssl_dhparam" | "ssl_conf_command"
        | "ssl_stapling" | "ssl_stapling_verify" | "ssl_password_file" | "ssl_early_data" | "ssl_buffer_size"
        | "ssl_verify_depth" | "ssl_trusted_certificate" | "ssl_crl" | "ssl_ocsp" => {
            "splicer uses rustls's cipher suites, curves, session cache and tickets; it has no CRL or OCSP"
        }
        "ssl_preread" => "routing by server name without terminating is protocol = \"tls-passthrough\" with sni routes",
        "map" | "geo" | "split_clients" | "set" => "nginx variables are not evaluated",
        "limit_conn" | "limit_conn_zone" | "limit_req" | "limit_req_zone" | "limit_rate" => {
            "limits are per listener in splicer: max-conns, rate-limit and max-connect-rate"
        }
        "proxy_next_upstream" | "proxy_next_upstream_tries" | "proxy_next_upstream_timeout" => {
            "splicer tries the next upstream when a connect fails, every upstream once"
        }
        "proxy_ssl" | "proxy_ssl_certificate" | "proxy_ssl_certificate_key" | "proxy_ssl_verify" | "proxy_ssl_server_name" => {
            "splicer does not speak TLS to upstreams"
        }
        "return" | "root" | "alias" | "index" | "try_files" | "rewrite" | "types" | "default_type" | "error_page"
        | "add_header" | "charset" | "gzip" | "expires" | "server_tokens" | "autoindex" => {
            "serving HTTP content: splicer only carries WebSocket upgrades"
        }
        _ => "splicer has no equivalent",
    }
}

impl Walk {
    fn skip(&mut self, d: &Directive, why: impl Into<String>) {
        self.skipped.push(Skipped {
            line: d.span.start.line,
            text: show(d),
            why: why.into(),
        });
    }

    fn skip_unknown(&mut self, d: &Directive) {
        self.skip(d, unknown_reason(&d.name));
    }

    /// A `stream { }` or `http { }` block.
    fn module(&mut self, m: Module, block: &Block) {
        let mut upstreams = HashMap::new();
        for d in block.directives().filter(|d| d.name == "upstream") {
            match (arg(d, 0), &d.block) {
                (Some(name), Some(b)) if d.args.len() == 1 => {
                    let pass = self.upstream_block(m, &name, b);
                    upstreams.insert(name, pass);
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
                _ if self.take(&mut scope, m, d) => {}
                _ => self.skip_unknown(d),
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
        for p in d
            .args
            .iter()
            .skip(1)
            .map(nginx_lint_parser::ast::Argument::as_str)
        {
            match p.split_once('=') {
                Some(("weight", n)) => match n.parse() {
                    Ok(n) => weight = n,
                    Err(_) => return self.skip(d, "a weight is a whole number"),
                },
                None if p == "down" => weight = 0,
                None if p == "backup" => {
                    return self.skip(d, "splicer has no backup servers: list it as an upstream to share the load, or leave it out")
                }
                _ => self.skipped.push(Skipped {
                    line: d.span.start.line,
                    text: format!("{} ({p})", show(d)),
                    why: match p.split_once('=').map(|(k, _)| k) {
                        Some("max_fails" | "fail_timeout") => {
                            "splicer takes an upstream down after health-fall failed connects or checks, and back after health-rise good checks".into()
                        }
                        Some("resolve") | None if p == "resolve" => "names are re-resolved every resolve-interval anyway".into(),
                        _ => "splicer has no equivalent of this parameter".into(),
                    },
                }),
            }
        }
        pass.upstream.push(match weight {
            1 => addr,
            w => format!("{addr} weight={w}"),
        });
    }

    /// `proxy_pass`: an upstream block's name, or an address (http: a URL).
    fn proxy_pass(&mut self, m: Module, d: &Directive, upstreams: &HashMap<String, Pass>) -> Option<Pass> {
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
                let Some(rest) = target.strip_prefix("http://") else {
                    self.skip(d, "splicer does not speak TLS to upstreams (https://)");
                    return None;
                };
                let (host, uri) = rest.split_once('/').map_or((rest, ""), |(h, u)| (h, u));
                let notes = match uri.is_empty() {
                    true => Vec::new(),
                    false => vec![format!(
                        "nginx replaced the location's path with /{uri}; splicer passes the request path as the client sent it"
                    )],
                };
                (host, Some(80), notes)
            }
        };
        if let Some(pass) = upstreams.get(host) {
            let mut pass = pass.clone();
            pass.notes.append(&mut notes);
            return Some(pass);
        }
        match upstream_addr(host, default_port) {
            Some(addr) => Some(Pass {
                upstream: vec![addr],
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
            Some(t) => *slot = Some(t),
            None => w.skip(d, "not a time splicer reads (ms, s, m, h, d, w)"),
        };
        match (m, d.name.as_str()) {
            (_, "set_real_ip_from") => match cidr(&a0) {
                Some(net) => scope.trusted.push(net),
                None => self.skip(d, "splicer trusts IP addresses and CIDRs only"),
            },
            (Module::Http, "real_ip_header") => scope.real_ip_header = Some(a0),
            (Module::Http, "real_ip_recursive") => scope.real_ip_recursive = a0 == "on",
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
                let net = match a0.as_str() {
                    "all" => None,
                    other => match cidr(other) {
                        Some(net) => Some(net),
                        None => {
                            self.skip(d, "splicer allows and denies IP addresses and CIDRs only");
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
                    net,
                    line,
                    text: show(d),
                });
            }
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
        let mut pass = None;
        let mut locations = Vec::new();
        for d in block.directives() {
            match (m, d.name.as_str()) {
                (_, "listen") => listens.extend(self.listen(m, d)),
                (Module::Stream, "proxy_pass") => pass = self.proxy_pass(m, d, upstreams),
                (Module::Http, "location") => locations.push(d),
                _ if self.take(&mut scope, m, d) => {}
                _ => self.skip_unknown(d),
            }
        }
        let (pass, ws) = match m {
            Module::Stream => (pass, None),
            Module::Http => match self.ws_location(&locations, &scope, upstreams) {
                Some(ws) => (Some(ws.pass.clone()), Some(ws)),
                None => (None, None),
            },
        };
        let Some(pass) = pass else {
            if !listens.is_empty() {
                self.skipped.push(Skipped {
                    line,
                    text: "server { ... }".into(),
                    why: match m {
                        Module::Stream => "no proxy_pass: nothing to forward to".into(),
                        Module::Http => "no location with a proxy_pass: nothing to forward to".into(),
                    },
                });
            }
            return;
        };
        for listen in listens {
            if let Some(other) = self.listeners.iter().find(|l| l.draft.listen == listen.addr) {
                self.skipped.push(Skipped {
                    line,
                    text: format!("listen {}", listen.addr),
                    why: format!(
                        "{} already listens there: splicer does not choose servers by name",
                        other.origin
                    ),
                });
                continue;
            }
            let converted = self.listener(
                m,
                line,
                listen,
                ws.as_ref().map_or(&scope, |w| &w.scope),
                &pass,
                ws.as_ref(),
            );
            self.listeners.push(converted);
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
                "udp" | "quic" | "http2" | "http3" => {
                    self.skip(
                        d,
                        format!(
                            "splicer carries TCP{} only",
                            if m == Module::Http {
                                " and HTTP/1.1 upgrades"
                            } else {
                                ""
                            }
                        ),
                    );
                    return None;
                }
                // One server per address: nothing to be the default among.
                "default_server" | "default" => {}
                _ => self.skipped.push(Skipped {
                    line: d.span.start.line,
                    text: format!("{} ({p})", show(d)),
                    why: "socket options of listen are not translated".into(),
                }),
            }
        }
        Some(listen)
    }

    /// The first `location` with a `proxy_pass` is the WebSocket path; the
    /// others are named as not translated.
    fn ws_location(
        &mut self,
        locations: &[&Directive],
        server: &Scope,
        upstreams: &HashMap<String, Pass>,
    ) -> Option<WsLocation> {
        let mut chosen: Option<WsLocation> = None;
        for d in locations {
            let Some(block) = &d.block else { continue };
            let args: Vec<String> = (0..d.args.len()).filter_map(|i| arg(d, i)).collect();
            let (exact, path) = match args.as_slice() {
                [p] if !p.starts_with('@') => (false, p.clone()),
                [m, p] if m == "=" => (true, p.clone()),
                [m, p] if m == "^~" => (false, p.clone()),
                _ => {
                    self.skip(
                        d,
                        "regular-expression and named locations: splicer matches one exact WebSocket path",
                    );
                    continue;
                }
            };
            let mut scope = server.inner();
            let mut pass = None;
            for inner in block.directives() {
                match inner.name.as_str() {
                    "proxy_pass" => pass = self.proxy_pass(Module::Http, inner, upstreams),
                    "location" => self.skip(
                        inner,
                        "nested locations: splicer matches one exact WebSocket path",
                    ),
                    _ if self.take(&mut scope, Module::Http, inner) => {}
                    _ => self.skip_unknown(inner),
                }
            }
            let Some(pass) = pass else {
                self.skip(d, "no proxy_pass: splicer only forwards");
                continue;
            };
            if let Some(first) = &chosen {
                self.skip(
                    d,
                    format!(
                        "a splicer listener carries one WebSocket path ({}); its clients get 404",
                        first.path.as_deref().unwrap_or("any")
                    ),
                );
                continue;
            }
            chosen = Some(WsLocation {
                exact,
                path: match path.as_str() {
                    "/" => None,
                    p => Some(p.to_string()),
                },
                scope,
                pass,
            });
        }
        chosen
    }

    /// One listener from a `listen` and everything in force where the
    /// `proxy_pass` is.
    fn listener(
        &mut self,
        m: Module,
        line: usize,
        listen: Listen,
        scope: &Scope,
        pass: &Pass,
        ws: Option<&WsLocation>,
    ) -> Converted {
        let port = listen.addr.port();
        let mut name = format!("{}-{port}", m.name());
        let taken = |n: &str| self.listeners.iter().any(|l| l.draft.name == n);
        let mut i = 2;
        while taken(&name) {
            name = format!("{}-{port}-{i}", m.name());
            i += 1;
        }
        let protocol = match m {
            Module::Stream => Protocol::Tcp,
            Module::Http => Protocol::Ws,
        };
        let mut draft = Draft::new(name, listen.addr, protocol);
        let mut notes = pass.notes.clone();
        draft.upstream.clone_from(&pass.upstream);
        draft.balance = pass.balance;
        draft.connect_timeout = scope.connect_timeout;
        if listen.proxy_protocol {
            draft.accept_proxy = Some(AcceptProxy::Auto);
            draft.proxy_timeout = scope.proxy_protocol_timeout;
        }
        let trusted = scope.trusted.items.clone();
        match m {
            Module::Stream => {
                draft.send_proxy = scope.send_proxy.then_some(SendProxy::V1);
                match (listen.proxy_protocol, trusted.is_empty()) {
                    (true, false) => draft.trusted_proxy = trusted,
                    (true, true) => notes.push(
                        "no set_real_ip_from: the PROXY header is read and its address not believed, as nginx does; \
                         the broker is told the peer's address"
                            .into(),
                    ),
                    (false, false) => notes.push(
                        "set_real_ip_from without `listen ... proxy_protocol` has nothing to trust; left out".into(),
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
                self.ws_keys(&mut draft, &mut notes, scope, &listen, trusted);
                let path = ws.and_then(|w| w.path.clone());
                if let (Some(path), Some(false)) = (&path, ws.map(|w| w.exact)) {
                    notes.push(format!(
                        "nginx's `location {path}` also matched longer paths; splicer takes {path} exactly"
                    ));
                }
                draft.ws_path = Some(path.unwrap_or_else(|| "*".into()));
            }
        }
        self.access(&mut draft, &mut notes, scope);
        self.tls(&mut draft, &mut notes, scope, &listen);
        Converted {
            origin: format!("{} server (line {line}), listen {}", m.name(), listen.addr),
            notes,
            draft,
        }
    }

    /// The real-IP module and the forwarding headers of a WebSocket listener.
    fn ws_keys(
        &mut self,
        draft: &mut Draft,
        notes: &mut Vec<String>,
        scope: &Scope,
        listen: &Listen,
        trusted: Vec<IpNet>,
    ) {
        // nginx's realip module does nothing without set_real_ip_from; with
        // it, real_ip_header defaults to X-Real-IP.
        let realip = !trusted.is_empty();
        if realip {
            let header = scope.real_ip_header.clone().unwrap_or_else(|| "X-Real-IP".into());
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
                draft.real_ip_recursive = scope.real_ip_recursive;
            }
        }
        let mut forwarded_for = None;
        let mut forwarded_port = None;
        for h in &scope.headers.items {
            let value: String = h.value.split_whitespace().collect::<Vec<_>>().join(" ");
            let skip = |w: &mut Walk, why: &str| {
                w.skipped.push(Skipped {
                    line: h.line,
                    text: h.text.clone(),
                    why: why.into(),
                });
            };
            match (h.name.to_ascii_lowercase().as_str(), value.as_str()) {
                ("upgrade", "$http_upgrade") | ("host", "$host" | "$http_host") => {}
                ("connection", v) if v.eq_ignore_ascii_case("upgrade") || v == "$connection_upgrade" => {}
                ("x-forwarded-for", "$remote_addr") => forwarded_for = Some(ForwardMode::Override),
                ("x-forwarded-for", "$http_x_forwarded_for, $realip_remote_addr") => {
                    forwarded_for = Some(ForwardMode::Append);
                }
                ("x-forwarded-for", "$proxy_add_x_forwarded_for" | "$http_x_forwarded_for, $remote_addr") => {
                    forwarded_for = Some(ForwardMode::Append);
                    if realip {
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
                    if realip {
                        notes.push(
                            "X-Forwarded-Port: nginx appended the resolved client's port; splicer appends the peer's".into(),
                        );
                    }
                }
                (_, "$remote_addr") if draft.set_real_ip_header.is_none() => {
                    draft.set_real_ip_header = Some(h.name.clone());
                }
                ("host", _) => skip(self, "splicer passes the client's Host as it came"),
                ("x-forwarded-for" | "x-forwarded-port", _) => {
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
        let unset = |mode: &mut Option<ForwardMode>, header: &str, notes: &mut Vec<String>| {
            if mode.is_none() {
                *mode = Some(ForwardMode::Override);
                notes.push(format!(
                    "nginx passed on whatever {header} the client sent; splicer overrides it with the client's own"
                ));
            }
        };
        unset(&mut forwarded_for, "X-Forwarded-For", notes);
        unset(&mut forwarded_port, "X-Forwarded-Port", notes);
        draft.forwarded_for = forwarded_for;
        draft.forwarded_port = forwarded_port;
    }

    /// `allow`/`deny`, when splicer's sets (deny wins, an allow list lets
    /// in only what it names) mean what nginx's first match did.
    fn access(&mut self, draft: &mut Draft, notes: &mut Vec<String>, scope: &Scope) {
        let rules = &scope.access.items;
        let Some(last) = rules.last() else { return };
        let body = &rules[..rules.len() - 1];
        let nets = |want: Access| {
            body.iter()
                .filter(|r| r.access == want)
                .filter_map(|r| r.net)
                .collect::<Vec<_>>()
        };
        let all_of = |want: Access| body.iter().all(|r| r.access == want && r.net.is_some());
        match (last.access, last.net) {
            // allow ...; deny all;
            (Access::Deny, None) if all_of(Access::Allow) => draft.allow = nets(Access::Allow),
            // deny ...; allow all;
            (Access::Allow, None) if all_of(Access::Deny) => draft.deny = nets(Access::Deny),
            // deny ...; (nothing matched is allowed)
            (Access::Deny, Some(net)) if all_of(Access::Deny) => {
                draft.deny = nets(Access::Deny);
                draft.deny.push(net);
            }
            _ => {
                for r in rules {
                    self.skipped.push(Skipped {
                        line: r.line,
                        text: r.text.clone(),
                        why: "splicer's deny list wins over its allow list; this order of rules means something else: write allow and deny by hand".into(),
                    });
                }
                notes.push("allow/deny not translated: every client is let in".into());
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
            notes.push("nginx read relative certificate paths from its prefix (/etc/nginx); splicer reads them from its working directory".into());
        }
        if let Some((versions, line, text)) = &scope.protocols {
            let has = |v: &str| versions.iter().any(|x| x == v);
            if has("TLSv1.2") {
                draft.tls_min_version = Some(MinVersion::Tls12);
            } else if has("TLSv1.3") {
                draft.tls_min_version = Some(MinVersion::Tls13);
            }
            if has("TLSv1") || has("TLSv1.1") || has("SSLv3") {
                self.skipped.push(Skipped {
                    line: *line,
                    text: text.clone(),
                    why: "splicer speaks TLS 1.2 and 1.3 only".into(),
                });
            }
        }
        if let Some(auth) = scope.verify_client {
            draft.tls_client_ca.clone_from(&scope.client_ca);
            draft.tls_client_auth = Some(auth);
        }
        draft.tls_handshake_timeout = scope.handshake_timeout;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> (Draft, Vec<String>, Vec<Skipped>) {
        let c = convert(text).unwrap();
        assert_eq!(c.listeners.len(), 1, "{c:#?}");
        let l = c.listeners.into_iter().next().unwrap();
        (l.draft, l.notes, c.skipped)
    }

    #[test]
    fn times() {
        let t = |s: &str| nginx_time(s).map(|d| d.0);
        assert_eq!(t("5"), Some(Duration::from_secs(5)));
        assert_eq!(t("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(t("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(t("2h"), Some(Duration::from_hours(2)));
        assert_eq!(t("1y"), None);
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
        assert_eq!(d.trusted_proxy, ["172.16.0.0/24".parse::<IpNet>().unwrap()]);
        assert!(notes.is_empty(), "{notes:?}");
        assert!(skipped.is_empty(), "{skipped:?}");
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
        assert_eq!(d.trusted_proxy, ["172.16.0.0/24".parse::<IpNet>().unwrap()]);
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
    }

    #[test]
    fn http_realip_defaults_to_x_real_ip() {
        let (d, _, _) = one("http { set_real_ip_from 10.0.0.0/8; server { listen 80; location /mqtt { proxy_pass http://10.0.0.1:8083; } } }");
        assert_eq!(d.real_ip_header.as_deref(), Some("X-Real-IP"));
        assert!(!d.real_ip_recursive);
    }

    #[test]
    fn inner_lists_replace_outer_ones() {
        let (d, _, _) = one(
            "stream { set_real_ip_from 10.0.0.0/8; set_real_ip_from 10.1.0.0/16;
               server { listen 1 proxy_protocol; set_real_ip_from 192.168.0.1; proxy_pass 10.0.0.1:1; } }",
        );
        assert_eq!(d.trusted_proxy, ["192.168.0.1/32".parse::<IpNet>().unwrap()]);
        let (d, _, _) = one("stream { set_real_ip_from 10.0.0.0/8; server { listen 1 proxy_protocol; proxy_pass 10.0.0.1:1; } }");
        assert_eq!(d.trusted_proxy, ["10.0.0.0/8".parse::<IpNet>().unwrap()]);
    }

    #[test]
    fn upstream_details() {
        let c = convert(
            "stream {
               server { listen 1883; proxy_pass brokers; proxy_connect_timeout 3s; }
               upstream brokers {
                 least_conn;
                 server 10.0.0.1:1883 weight=3 max_fails=2;
                 server emqx-1.emqx:1883;
                 server 10.0.0.3:1883 down;
                 server 10.0.0.4:1883 backup;
               }
             }",
        )
        .unwrap();
        let d = &c.listeners[0].draft;
        assert_eq!(
            d.upstream,
            [
                "10.0.0.1:1883 weight=3",
                "emqx-1.emqx:1883",
                "10.0.0.3:1883 weight=0"
            ]
        );
        assert_eq!(d.balance, Some(Balance::LeastConn));
        assert_eq!(d.connect_timeout, Some(Dur(Duration::from_secs(3))));
        let lines: Vec<usize> = c.skipped.iter().map(|s| s.line).collect();
        assert_eq!(lines, [5, 8], "{:#?}", c.skipped);
    }

    #[test]
    fn access_rules() {
        let access = |rules: &str| {
            let c = convert(&format!(
                "stream {{ server {{ listen 1; proxy_pass 10.0.0.1:1; {rules} }} }}"
            ))
            .unwrap();
            let d = &c.listeners[0].draft;
            (d.allow.len(), d.deny.len(), c.skipped.len())
        };
        assert_eq!(access("allow 10.0.0.0/8; allow 10.1.1.1; deny all;"), (2, 0, 0));
        assert_eq!(access("deny 10.0.0.0/8; allow all;"), (0, 1, 0));
        assert_eq!(access("deny 10.0.0.0/8;"), (0, 1, 0));
        // First match wins in nginx: the allow inside the deny is lost in splicer.
        assert_eq!(
            access("allow 10.1.0.0/16; deny 10.0.0.0/8; allow all;"),
            (0, 0, 3)
        );
    }

    #[test]
    fn tls_listener() {
        let (d, _, skipped) = one("stream { server { listen 8883 ssl; proxy_pass 10.0.0.1:1883;
               ssl_certificate /etc/x/a.pem; ssl_certificate_key /etc/x/a.key;
               ssl_protocols TLSv1.1 TLSv1.2 TLSv1.3; ssl_ciphers HIGH;
               ssl_client_certificate /etc/x/ca.pem; ssl_verify_client optional; } }");
        assert_eq!(d.tls_cert, [PathBuf::from("/etc/x/a.pem")]);
        assert_eq!(d.tls_key, [PathBuf::from("/etc/x/a.key")]);
        assert_eq!(d.tls_min_version, Some(MinVersion::Tls12));
        assert_eq!(d.tls_client_ca, Some(PathBuf::from("/etc/x/ca.pem")));
        assert_eq!(d.tls_client_auth, Some(ClientAuth::Optional));
        assert_eq!(skipped.len(), 2, "TLSv1.1 and ssl_ciphers: {skipped:#?}");
    }

    #[test]
    fn everything_else_is_named_with_its_line() {
        let c = convert(
            "worker_processes auto;\nevents { worker_connections 1024; }\nhttp {\n  include mime.types;\n  server {\n    listen 80;\n    server_name x;\n    location /mqtt { proxy_pass http://10.0.0.1:8083; proxy_set_header X-Forwarded-Proto $scheme; }\n    location /static { root /srv; }\n  }\n}\n",
        )
        .unwrap();
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
    fn deep_nesting_is_refused_before_parsing() {
        let deep = |n: usize| format!("{}{}", "http {\n".repeat(n), "}".repeat(n));
        let e = convert(&deep(5000)).unwrap_err();
        assert!(format!("{e}").contains("at line 65"), "{e}");
        assert!(convert(&deep(MAX_DEPTH)).is_ok());
        // Braces in quotes and comments are not nesting.
        let text = format!(
            "# {}\nhttp {{ add_header X \"{}\"; }}",
            "{".repeat(100),
            "{".repeat(100)
        );
        assert!(convert(&text).is_ok());
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
