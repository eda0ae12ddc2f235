//! Configuration: the TOML file and the single-listener command-line flags,
//! both turned into one validated `Config`. Keys in the file mirror the flags.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use ipnet::IpNet;

use splicer_proto::proxy_protocol::{Version, Versions};

pub use crate::tls::certs::{ClientAuth, MinVersion, Terminate};

/// `--send-proxy`: which PROXY protocol header to write upstream first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SendProxy {
    Off,
    V1,
    V2,
}

impl SendProxy {
    pub fn version(self) -> Option<Version> {
        match self {
            SendProxy::Off => None,
            SendProxy::V1 => Some(Version::V1),
            SendProxy::V2 => Some(Version::V2),
        }
    }
}

/// `--accept-proxy`: which PROXY header every peer must send first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AcceptProxy {
    Off,
    V1,
    V2,
    /// Either, told apart by the first bytes.
    Auto,
}

impl AcceptProxy {
    /// The header versions to parse for; None when no header is expected.
    pub fn versions(self) -> Option<Versions> {
        match self {
            AcceptProxy::Off => None,
            AcceptProxy::V1 => Some(Versions::V1),
            AcceptProxy::V2 => Some(Versions::V2),
            AcceptProxy::Auto => Some(Versions::Auto),
        }
    }
}

/// `--protocol`: what the listener's clients speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Any bytes over TCP, forwarded as they come.
    Tcp,
    /// Any bytes over WebSocket: the upgrade is read and rewritten.
    Ws,
    /// MQTT over TCP: the first packet must be a CONNECT, read before an
    /// upstream is chosen.
    Mqtt,
    /// MQTT over WebSocket: the upgrade as `ws`, then the CONNECT read
    /// from the first frames after the broker's 101 (the client sends it
    /// only then, so the upstream is chosen before it).
    #[serde(rename = "mqtt-ws")]
    MqttWs,
    /// TLS, not terminated: the ClientHello read for its server name,
    /// which picks the upstream group (`sni`); then spliced as it is.
    #[serde(rename = "tls-passthrough")]
    TlsPassthrough,
}

/// `--forwarded-for` / `--forwarded-port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ForwardMode {
    /// Replace what came in (nginx `$remote_addr`).
    Override,
    /// Add to what came in (nginx `$proxy_add_x_forwarded_for`).
    Append,
}

/// `--untrusted-proxy`: what to do with a PROXY header from a peer outside
/// `--trusted-proxy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum UntrustedProxy {
    /// Use the peer's own address, log and count the spoof attempt.
    Ignore,
    /// Close the connection.
    Reject,
}

/// `--offload`: who carries the bulk bytes once a connection is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OffloadMode {
    /// sockmap when the eBPF program loads, userspace otherwise.
    Auto,
    /// sockmap or refuse to start.
    Sockmap,
    Userspace,
}

/// `--log-format`: how log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line of text per record, as the README shows them.
    #[default]
    Text,
    /// One JSON object per line, with stable field names (app::logging).
    Json,
}

/// `--handoff`: when the kernel takes a connection over (sockmap offload
/// only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Handoff {
    /// As soon as the connection is set up.
    Now,
    /// Once it proves worth it, HAProxy's `splice-auto` idea: relayed in
    /// userspace first, and handed to the kernel when it goes idle or
    /// carries a bulk stream (datapath::relay::relay_or_promote). Short
    /// and chatty connections never pay for the two psocks. The default:
    /// it serves MQTT best (short connections and saturated small
    /// messages stay in userspace, idle clients and bulk go to the kernel).
    #[default]
    Auto,
}

/// `--log-level`, as the `log` crate names levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLevel(pub log::LevelFilter);

impl FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        log::LevelFilter::from_str(s)
            .map(LogLevel)
            .map_err(|_| format!("`{s}` is not a log level (off, error, warn, info, debug, trace)"))
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// A duration written the humantime way: `500ms`, `5s`, `1m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s)
            .map(Dur)
            .map_err(|e| format!("`{s}` is not a duration like 500ms, 5s or 1m: {e}"))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// Written back as humantime writes it (`convert-nginx`).
impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// A rate written `N/s`, `N/m` or `N/h` (`rate-limit`, `max-connect-rate`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerSecond(pub f64);

impl FromStr for PerSecond {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a rate like 20/s, 600/m or 1000/h");
        let (n, per) = s.split_once('/').ok_or_else(bad)?;
        let n: f64 = n.trim().parse().map_err(|_| bad())?;
        let secs = match per.trim() {
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        match n.is_finite() && n > 0.0 {
            true => Ok(PerSecond(n / secs)),
            false => Err(format!("`{s}`: the rate must be greater than zero")),
        }
    }
}

impl<'de> Deserialize<'de> for PerSecond {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// A token bucket's settings: `burst` at once, refilled at `per_sec`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_sec: f64,
    pub burst: u32,
}

impl Rate {
    /// A burst of one second's worth (at least one) unless given.
    fn new(rate: PerSecond, burst: Option<u32>) -> Rate {
        Rate {
            per_sec: rate.0,
            burst: burst.unwrap_or_else(|| rate.0.ceil().clamp(1.0, f64::from(u32::MAX)) as u32),
        }
    }
}

/// New-connection rate limits (ingress/limit.rs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// `rate-limit` with `rate-limit-burst`, per source prefix.
    pub per_source: Option<Rate>,
    /// `max-connect-rate`, for the whole listener.
    pub listener: Option<Rate>,
    /// `rate-limit-prefix-v4` / `-v6`: how much of an address is a source.
    pub prefix_v4: u8,
    pub prefix_v6: u8,
}

impl RateLimit {
    /// The source prefix `client` counts against.
    pub fn source_of(&self, client: IpAddr) -> IpNet {
        let net = match splicer_proto::trust::canonical(client) {
            IpAddr::V4(a) => IpNet::new(a.into(), self.prefix_v4),
            IpAddr::V6(a) => IpNet::new(a.into(), self.prefix_v6),
        };
        net.expect("prefix lengths are validated").trunc()
    }
}

pub const DEFAULT_RATE_PREFIX_V4: u8 = 32;
pub const DEFAULT_RATE_PREFIX_V6: u8 = 64;

/// `--balance`: how a listener picks an upstream for a new client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// In turn, in proportion to weight (nginx's smooth weighted round-robin).
    RoundRobin,
    /// The upstream with the fewest live connections per unit of weight.
    LeastConn,
    /// A hash of the real client IP: the same client lands on the same broker.
    Source,
    /// A hash of the MQTT client identifier (protocol = "mqtt"): a client
    /// finds its session on the broker it left it on, from any address.
    /// An empty client ID (the broker assigns one) hashes the real IP; a
    /// client that then reconnects with the ID it was assigned may land
    /// elsewhere.
    ClientId,
}

/// `--health-check`: how upstreams are probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheck {
    /// No active checks and no passive marking: every upstream is always tried.
    Off,
    /// A TCP connect every interval.
    Tcp,
    /// An MQTT CONNECT answered by a CONNACK (after a PROXY header if the
    /// listener sends them).
    Mqtt,
    /// An HTTP GET answered with the expected status (EMQX's
    /// `/api/v5/load_rebalance/availability_check`: 503 while the node is
    /// drained or rebalanced).
    Http,
}

/// One upstream broker: `ADDR` or `ADDR weight=N` (HAProxy's `weight`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upstream {
    pub addr: SocketAddr,
    /// 0 takes no new clients (to drain a broker by reload); default 1.
    pub weight: u32,
}

pub const MAX_WEIGHT: u32 = 256;

impl FromStr for Upstream {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut words = s.split_whitespace();
        let addr = words.next().unwrap_or("");
        let addr = addr
            .parse()
            .map_err(|_| format!("`{addr}` is not an address like 127.0.0.1:1883 or [::1]:1883"))?;
        Ok(Upstream { addr, weight: weight(words, s)? })
    }
}

/// The `weight=N` words after an upstream's address (default 1).
fn weight<'a>(words: impl Iterator<Item = &'a str>, s: &str) -> Result<u32, String> {
    let mut weight = 1;
    for w in words {
        weight = w
            .strip_prefix("weight=")
            .and_then(|n| n.parse().ok())
            .filter(|n| *n <= MAX_WEIGHT)
            .ok_or_else(|| format!("`{w}` in `{s}`: expected weight=N with N from 0 to {MAX_WEIGHT}"))?;
    }
    Ok(weight)
}

/// An `upstream` entry as written: an address, or a DNS name and port,
/// resolved at start and every `resolve-interval` (app::resolve).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamSpec {
    Addr(Upstream),
    Name(NamedUpstream),
}

/// `broker.example:1883 weight=2`: every address the name resolves to is
/// an upstream of its own, with this weight.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamedUpstream {
    pub host: String,
    pub port: u16,
    pub weight: u32,
}

impl FromStr for UpstreamSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut words = s.split_whitespace();
        if words.clone().next().is_some_and(|w| w.parse::<SocketAddr>().is_ok()) {
            return s.parse().map(UpstreamSpec::Addr);
        }
        let first = words.next().unwrap_or("");
        let not = || format!("`{first}` is not an address like 127.0.0.1:1883 or [::1]:1883, nor a name like broker.example:1883");
        let (host, port) = first.rsplit_once(':').ok_or_else(not)?;
        let port: u16 = port.parse().map_err(|_| not())?;
        if port == 0 || !is_dns_name(host) {
            return Err(not());
        }
        Ok(UpstreamSpec::Name(NamedUpstream {
            host: host.to_ascii_lowercase(),
            port,
            weight: weight(words, s)?,
        }))
    }
}

/// Letters, digits and hyphens in dot-separated labels of 1 to 63 (RFC
/// 1123), not all digits (that would be an address).
fn is_dns_name(h: &str) -> bool {
    let h = h.strip_suffix('.').unwrap_or(h);
    h.len() <= 253
        && !h.split('.').all(|l| l.bytes().all(|b| b.is_ascii_digit()))
        && h.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

impl<'de> Deserialize<'de> for UpstreamSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

impl fmt::Display for NamedUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.weight {
            1 => write!(f, "{}:{}", self.host, self.port),
            w => write!(f, "{}:{} weight={w}", self.host, self.port),
        }
    }
}

impl<'de> Deserialize<'de> for Upstream {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.weight {
            1 => write!(f, "{}", self.addr),
            w => write!(f, "{} weight={w}", self.addr),
        }
    }
}

/// Active health checks, HAProxy style.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub check: HealthCheck,
    pub interval: Duration,
    /// Consecutive successes that bring a down upstream back.
    pub rise: u32,
    /// Consecutive failures (checks or client connects) that take it down.
    pub fall: u32,
    /// Some with `check = Http`.
    pub http: Option<HttpCheck>,
}

/// `health-check = "http"`: what is asked, where, and what must come back
/// (HAProxy's `option httpchk GET PATH` with `http-check expect status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCheck {
    /// None: the upstream's own port.
    pub port: Option<u16>,
    pub path: String,
    pub status: u16,
}

pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_HEALTH_RISE: u32 = 2;
pub const DEFAULT_HEALTH_FALL: u32 = 3;
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// As EMQX's listener `proxy_protocol_timeout`.
pub const DEFAULT_PROXY_TIMEOUT: Duration = Duration::from_secs(3);
pub const DEFAULT_WS_HEADER_MAX: usize = 16 * 1024;
/// Handshakes in flight per listener: enough for a reconnect storm at
/// loopback speed, few enough that their buffers (at most a header's
/// worth each) stay small.
pub const DEFAULT_MAX_HANDSHAKES: usize = 1024;
pub const DEFAULT_WS_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// As EMQX's `max_packet_size` would let a CONNECT with a will be, well
/// below it: a CONNECT is a handshake, held per client until it is whole.
pub const DEFAULT_MQTT_CONNECT_MAX: usize = 64 * 1024;
/// As EMQX's `idle_timeout`'s order of magnitude (15 s) and HAProxy's
/// `tcp-request inspect-delay` in its MQTT examples (10 s).
pub const DEFAULT_MQTT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// What `mqtt-connect-max` may be set to.
pub const MQTT_CONNECT_MAX_RANGE: std::ops::RangeInclusive<usize> = 128..=16 << 20;

/// The default largest ClientHello: browsers' and MQTT clients' are under
/// 2 KiB even with post-quantum key shares.
pub const DEFAULT_TLS_HELLO_MAX: usize = 16 * 1024;
pub const DEFAULT_TLS_HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// A handshake is a few round trips; a client still in it after this long
/// is holding a max-handshakes slot.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which server names an `sni` entry takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SniMatch {
    /// This name exactly (lowercase).
    Exact(String),
    /// `*.example.com`: any name ending in `.example.com` (the suffix,
    /// dot included), at any depth.
    Suffix(String),
    /// `*`: every other name, and a ClientHello without one.
    Any,
}

impl FromStr for SniMatch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.split('.').all(|l| {
                    !l.is_empty() && l.len() <= 63 && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
                })
        };
        let lower = s.to_ascii_lowercase();
        match lower.strip_prefix("*.") {
            _ if lower == "*" => Ok(SniMatch::Any),
            Some(rest) if name_ok(rest) => Ok(SniMatch::Suffix(format!(".{rest}"))),
            None if name_ok(&lower) => Ok(SniMatch::Exact(lower)),
            _ => Err(format!("`{s}` is not a server name, `*.suffix` or `*`")),
        }
    }
}

impl fmt::Display for SniMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SniMatch::Exact(n) => f.write_str(n),
            SniMatch::Suffix(s) => write!(f, "*{s}"),
            SniMatch::Any => f.write_str("*"),
        }
    }
}

/// `--sni NAME=ADDR`: one upstream of an SNI group (repeat the flag for
/// more); in the file, `sni = { "NAME" = ["ADDR", ...] }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniRoute {
    pub name: SniMatch,
    pub upstream: Upstream,
}

impl FromStr for SniRoute {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, up) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}`: expected NAME=ADDR, e.g. broker.example=10.0.0.11:8883"))?;
        Ok(SniRoute {
            name: name.trim().parse()?,
            upstream: up.trim().parse()?,
        })
    }
}

/// A key that takes one string or a list of them.
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(v) => v,
    })
}

/// The file's `sni` table: names to lists of upstreams.
fn sni_table<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SniRoute>, D::Error> {
    let table = std::collections::BTreeMap::<String, Vec<Upstream>>::deserialize(d)?;
    let mut routes = Vec::new();
    for (name, ups) in table {
        if ups.is_empty() {
            return Err(de::Error::custom(format!("`{name}` lists no upstream")));
        }
        let name: SniMatch = name.parse().map_err(de::Error::custom)?;
        routes.extend(ups.into_iter().map(|upstream| SniRoute { name: name.clone(), upstream }));
    }
    Ok(routes)
}

/// A `tls-passthrough` listener's ClientHello reading and routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPassthrough {
    pub hello_max: usize,
    pub hello_timeout: Duration,
    /// Upstream groups by server name, each in the order given; empty: every
    /// client goes to `upstream`.
    pub groups: Vec<(SniMatch, Vec<Upstream>)>,
}

/// An MQTT listener's CONNECT reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MqttOptions {
    pub connect_max: usize,
    pub connect_timeout: Duration,
}

/// A WebSocket listener's upgrade handling.
#[derive(Debug, Clone, PartialEq)]
pub struct WsOptions {
    /// None accepts any path.
    pub path: Option<String>,
    pub forwarded_for: ForwardMode,
    pub forwarded_port: ForwardMode,
    pub real_ip_header: Option<String>,
    pub real_ip_recursive: bool,
    pub set_real_ip_header: Option<String>,
    pub header_max: usize,
    pub header_timeout: Duration,
    /// Remove Sec-WebSocket-Extensions from the request, so that no
    /// extension (permessage-deflate) is agreed and the frames stay
    /// readable (mqtt-ws: the CONNECT is read from them).
    pub no_extensions: bool,
}

/// One listener, fully resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub name: String,
    pub listen: SocketAddr,
    /// The upstreams by address: those written as addresses, and (once
    /// app::resolve has run) those the `names` resolve to.
    pub upstreams: Vec<Upstream>,
    /// Upstreams written as DNS names.
    pub names: Vec<NamedUpstream>,
    pub balance: Balance,
    pub health: Health,
    /// Real client addresses let in; empty lets everyone in (unless denied).
    pub allow: Vec<IpNet>,
    /// Real client addresses turned away; wins over `allow`.
    pub deny: Vec<IpNet>,
    /// Live clients beyond which new ones are refused; None is no limit.
    pub max_conns: Option<u64>,
    /// Clients still in their handshake (PROXY header, upgrade request,
    /// the broker's answer) beyond which new ones are refused.
    pub max_handshakes: usize,
    pub rate_limit: RateLimit,
    pub send_proxy: SendProxy,
    pub connect_timeout: Duration,
    pub accept_proxy: AcceptProxy,
    /// Peers whose PROXY headers are believed (nginx `set_real_ip_from`).
    pub trusted_proxies: Vec<IpNet>,
    /// Send a trusted inbound header upstream verbatim instead of re-emitting.
    pub proxy_passthrough: bool,
    pub proxy_timeout: Duration,
    pub untrusted_proxy: UntrustedProxy,
    /// Some for WebSocket listeners.
    pub ws: Option<WsOptions>,
    /// Some for MQTT listeners.
    pub mqtt: Option<MqttOptions>,
    /// Some for `tls-passthrough` listeners. Their `upstreams` are every
    /// group's, for health checks and metrics.
    pub tls: Option<TlsPassthrough>,
    /// Some when TLS is terminated here (`tls-cert`): the client's bytes
    /// after the PROXY header are TLS, and what it says inside is read
    /// and forwarded as plaintext.
    pub terminate: Option<Terminate>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub log_level: log::LevelFilter,
    pub log_format: LogFormat,
    /// Where upstream names are resolved: its nameservers and options.
    pub resolv_conf: PathBuf,
    /// How often upstream names are resolved again (or their TTL, when
    /// shorter).
    pub resolve_interval: Duration,
    pub offload: OffloadMode,
    pub handoff: Handoff,
    /// Where to serve Prometheus metrics at /metrics.
    pub metrics: Option<SocketAddr>,
    /// How long SIGTERM waits for live connections before closing them.
    pub drain_timeout: Duration,
    /// `--max-buffered`: what spliced connections may hold in kernel queues
    /// beyond each direction's floor (None: the datapath's default).
    pub max_buffered: Option<u64>,
    pub listeners: Vec<Listener>,
}

/// The file as written; `deny_unknown_fields` makes a typo an error that
/// names the key, instead of a silently ignored setting.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    log_level: Option<LogLevel>,
    log_format: Option<LogFormat>,
    resolv_conf: Option<PathBuf>,
    resolve_interval: Option<Dur>,
    offload: Option<OffloadMode>,
    handoff: Option<Handoff>,
    metrics: Option<SocketAddr>,
    drain_timeout: Option<Dur>,
    max_buffered: Option<bytesize::ByteSize>,
    #[serde(default)]
    listener: Vec<ListenerSpec>,
}

/// A listener as written in the file or given by flags (the same struct
/// is both the serde table and the clap flags, so keys and flags cannot
/// drift apart). Unset keys take their defaults in `resolve`.
#[derive(Debug, Default, PartialEq, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ListenerSpec {
    /// The listener's name in logs (file only).
    #[arg(skip)] pub name: Option<String>,
    /// Address to accept clients on.
    #[arg(long, value_name = "ADDR")] pub listen: Option<SocketAddr>,
    /// Upstream broker: `ADDR` or `"ADDR weight=N"`; repeat for several.
    #[arg(long, value_name = "ADDR")] pub upstream: Vec<UpstreamSpec>,
    /// How to pick an upstream [default: round-robin].
    #[arg(long, value_enum, value_name = "round-robin|least-conn|source|client-id")] pub balance: Option<Balance>,
    /// Active upstream checks [default: off].
    #[arg(long, value_enum, value_name = "off|tcp|mqtt|http")] pub health_check: Option<HealthCheck>,
    /// health-check http: the port asked, on each upstream's address [default: the upstream's port].
    #[arg(long, value_name = "PORT")] pub health_http_port: Option<u16>,
    /// health-check http: the path asked [default: /].
    #[arg(long, value_name = "PATH")] pub health_http_path: Option<String>,
    /// health-check http: the status that means up [default: 200].
    #[arg(long, value_name = "CODE")] pub health_http_status: Option<u16>,
    /// Time between checks of one upstream [default: 2s].
    #[arg(long, value_name = "DURATION")] pub health_interval: Option<Dur>,
    /// Consecutive good checks that bring an upstream back [default: 2].
    #[arg(long, value_name = "N")] pub health_rise: Option<u32>,
    /// Consecutive failures (checks or client connects) that take an
    /// upstream down [default: 3].
    #[arg(long, value_name = "N")] pub health_fall: Option<u32>,
    /// Real client CIDRs let in; repeatable. Without any, all are let in.
    #[arg(long, value_name = "CIDR")] pub allow: Vec<IpNet>,
    /// Real client CIDRs turned away (wins over --allow); repeatable.
    #[arg(long, value_name = "CIDR")] pub deny: Vec<IpNet>,
    /// Refuse new clients while this many are connected [default: no limit].
    #[arg(long, value_name = "N")] pub max_conns: Option<u64>,
    /// Refuse new clients while this many are still in their handshake [default: 1024].
    #[arg(long, value_name = "N")] pub max_handshakes: Option<usize>,
    /// New connections per real client source, e.g. 20/s or 600/m [default: no limit].
    #[arg(long, value_name = "RATE")] pub rate_limit: Option<PerSecond>,
    /// Connections a source may open at once before rate-limit applies [default: one second's worth].
    #[arg(long, value_name = "N")] pub rate_limit_burst: Option<u32>,
    /// The IPv4 prefix length that is one source for rate-limit [default: 32].
    #[arg(long, value_name = "BITS")] pub rate_limit_prefix_v4: Option<u8>,
    /// The IPv6 prefix length that is one source for rate-limit [default: 64].
    #[arg(long, value_name = "BITS")] pub rate_limit_prefix_v6: Option<u8>,
    /// New connections per second for the whole listener, e.g. 1000/s [default: no limit].
    #[arg(long, value_name = "RATE")] pub max_connect_rate: Option<PerSecond>,
    /// PROXY protocol header to write upstream before any client byte [default: off].
    #[arg(long, value_enum, value_name = "off|v1|v2")] pub send_proxy: Option<SendProxy>,
    /// Give up on an upstream connect after this long and try the next [default: 5s].
    #[arg(long, value_name = "DURATION")] pub connect_timeout: Option<Dur>,
    /// Require a PROXY header first from every peer: off, v1, v2, or auto
    /// (either) [default: off].
    #[arg(long, value_enum, value_name = "off|v1|v2|auto")] pub accept_proxy: Option<AcceptProxy>,
    /// Peers whose PROXY headers (and forwarding headers) are believed;
    /// repeatable, IPv4 or IPv6 CIDR.
    #[arg(long, value_name = "CIDR")] pub trusted_proxy: Vec<IpNet>,
    /// Send a trusted peer's PROXY header upstream unchanged.
    #[arg(long)] pub proxy_passthrough: bool,
    /// How long a peer may take to send its whole PROXY header [default: 3s].
    #[arg(long, value_name = "DURATION")] pub proxy_timeout: Option<Dur>,
    /// A PROXY header from an untrusted peer: ignore it (use the peer's
    /// address) or reject the connection [default: ignore].
    #[arg(long, value_enum, value_name = "ignore|reject")] pub untrusted_proxy: Option<UntrustedProxy>,
    /// tcp (bytes over TCP), ws (over WebSocket), mqtt (MQTT over TCP, its
    /// CONNECT read first), mqtt-ws (MQTT over WebSocket, likewise) or
    /// tls-passthrough (TLS routed by server name, not terminated) [default: tcp].
    #[arg(long, value_enum, value_name = "tcp|ws|mqtt|mqtt-ws|tls-passthrough")] pub protocol: Option<Protocol>,
    /// mqtt, mqtt-ws: largest CONNECT packet, in bytes [default: 65536].
    #[arg(long, value_name = "BYTES")] pub mqtt_connect_max: Option<usize>,
    /// mqtt, mqtt-ws: how long a client may take to send its CONNECT [default: 10s].
    #[arg(long, value_name = "DURATION")] pub mqtt_connect_timeout: Option<Dur>,
    /// tls-passthrough: route clients asking for this server name (`*.suffix`
    /// for any under it, `*` for the rest) to this upstream; repeatable.
    #[arg(long = "sni", value_name = "NAME=ADDR")]
    #[serde(deserialize_with = "sni_table")]
    pub sni: Vec<SniRoute>,
    /// tls-passthrough: largest ClientHello, in bytes [default: 16384].
    #[arg(long, value_name = "BYTES")] pub tls_hello_max: Option<usize>,
    /// tls-passthrough: how long a client may take to send its ClientHello [default: 5s].
    #[arg(long, value_name = "DURATION")] pub tls_hello_timeout: Option<Dur>,
    /// Terminate TLS with this PEM certificate chain (leaf first), paired
    /// with the --tls-key at the same place; repeat for several: each is
    /// served to clients asking for one of its names, the first to the rest.
    #[arg(long, value_name = "FILE")]
    #[serde(deserialize_with = "one_or_many")]
    pub tls_cert: Vec<PathBuf>,
    /// The PEM private key of the --tls-cert at the same place.
    #[arg(long, value_name = "FILE")]
    #[serde(deserialize_with = "one_or_many")]
    pub tls_key: Vec<PathBuf>,
    /// Oldest TLS version accepted [default: 1.2].
    #[arg(long, value_enum, value_name = "1.2|1.3")] pub tls_min_version: Option<MinVersion>,
    /// ALPN protocols offered, in order of preference; repeatable; `alpn = []`
    /// in the file offers none [default: mqtt on tcp/mqtt, http/1.1 on ws/mqtt-ws].
    #[arg(long, value_name = "PROTOCOL")] pub alpn: Option<Vec<String>>,
    /// PEM CA certificates that client certificates are checked against (mTLS).
    #[arg(long, value_name = "FILE")] pub tls_client_ca: Option<PathBuf>,
    /// With tls-client-ca: must every client show a certificate [default: required].
    #[arg(long, value_enum, value_name = "optional|required")] pub tls_client_auth: Option<ClientAuth>,
    /// How long a client may take to finish its TLS handshake [default: 10s].
    #[arg(long, value_name = "DURATION")] pub tls_handshake_timeout: Option<Dur>,
    /// ws: the WebSocket path; `*` accepts any [default: /mqtt].
    #[arg(long, value_name = "PATH")] pub ws_path: Option<String>,
    /// ws: X-Forwarded-For: override (the client) or append (to what came in) [default: override].
    #[arg(long, value_enum, value_name = "override|append")] pub forwarded_for: Option<ForwardMode>,
    /// ws: X-Forwarded-Port, likewise [default: override].
    #[arg(long, value_enum, value_name = "override|append")] pub forwarded_port: Option<ForwardMode>,
    /// ws: take the real client from this header when the peer is trusted
    /// (e.g. X-Forwarded-For).
    #[arg(long, value_name = "NAME")] pub real_ip_header: Option<String>,
    /// ws: the real client is the rightmost untrusted address, not the rightmost.
    #[arg(long)] pub real_ip_recursive: bool,
    /// ws: send the real client upstream in this header (e.g. X-Real-IP).
    #[arg(long, value_name = "NAME")] pub set_real_ip_header: Option<String>,
    /// ws: largest upgrade request head, in bytes [default: 16384].
    #[arg(long, value_name = "BYTES")] pub ws_header_max: Option<usize>,
    /// ws: how long a client may take to send the upgrade request [default: 5s].
    #[arg(long, value_name = "DURATION")] pub ws_header_timeout: Option<Dur>,
}

impl ListenerSpec {
    pub fn resolve(self, index: usize) -> Result<Listener> {
        let name = self.name.clone().unwrap_or_else(|| format!("listener{index}"));
        let Some(listen) = self.listen else {
            bail!("listener `{name}`: key `listen` is required");
        };
        let protocol = self.protocol.unwrap_or(Protocol::Tcp);
        if self.rate_limit.is_none() {
            let with_rate = [
                ("rate-limit-burst", self.rate_limit_burst.is_some()),
                ("rate-limit-prefix-v4", self.rate_limit_prefix_v4.is_some()),
                ("rate-limit-prefix-v6", self.rate_limit_prefix_v6.is_some()),
            ];
            if let Some((key, _)) = with_rate.iter().find(|(_, set)| *set) {
                bail!("listener `{name}`: key `{key}`: needs `rate-limit`");
            }
        }
        let (reads_mqtt, is_ws) = match protocol {
            Protocol::Tcp | Protocol::TlsPassthrough => (false, false),
            Protocol::Ws => (false, true),
            Protocol::Mqtt => (true, false),
            Protocol::MqttWs => (true, true),
        };
        let is_tls = protocol == Protocol::TlsPassthrough;
        if !is_tls {
            let tls_only = [
                ("sni", !self.sni.is_empty()),
                ("tls-hello-max", self.tls_hello_max.is_some()),
                ("tls-hello-timeout", self.tls_hello_timeout.is_some()),
            ];
            if let Some((key, _)) = tls_only.iter().find(|(_, set)| *set) {
                bail!("listener `{name}`: key `{key}` applies to TLS passthrough listeners only (protocol = \"tls-passthrough\")");
            }
        }
        // The groups, in the order first named; `upstream` is the `*` group
        // when there is no other.
        let mut groups: Vec<(SniMatch, Vec<Upstream>)> = Vec::new();
        for r in &self.sni {
            match groups.iter_mut().find(|(n, _)| *n == r.name) {
                Some((_, ups)) => ups.push(r.upstream),
                None => groups.push((r.name.clone(), vec![r.upstream])),
            }
        }
        for (n, ups) in &groups {
            for (i, u) in ups.iter().enumerate() {
                if ups[..i].iter().any(|o| o.addr == u.addr) {
                    bail!("listener `{name}`: key `sni`: {} is listed twice for `{n}` (use weight=N)", u.addr);
                }
            }
            if ups.iter().all(|u| u.weight == 0) {
                bail!("listener `{name}`: key `sni`: every weight for `{n}` is 0, so it would take no client");
            }
        }
        if self.health_check != Some(HealthCheck::Http) {
            let http_only = [
                ("health-http-port", self.health_http_port.is_some()),
                ("health-http-path", self.health_http_path.is_some()),
                ("health-http-status", self.health_http_status.is_some()),
            ];
            if let Some((key, _)) = http_only.iter().find(|(_, set)| *set) {
                bail!("listener `{name}`: key `{key}`: needs health-check = \"http\"");
            }
        }
        if is_tls && self.health_check == Some(HealthCheck::Http) && self.health_http_port.is_none() {
            bail!(
                "listener `{name}`: key `health-http-port`: needed with health-check = \"http\" on tls-passthrough \
                 listeners (the upstreams' own port speaks TLS)"
            );
        }
        if is_tls && self.health_check == Some(HealthCheck::Mqtt) {
            bail!(
                "listener `{name}`: key `health-check`: \"mqtt\" would speak plaintext MQTT to TLS brokers; \
                 use \"tcp\" on tls-passthrough listeners"
            );
        }
        let terminate = self.terminate(&name, protocol, is_ws)?;
        if !self.sni.is_empty() && self.upstream.iter().any(|u| matches!(u, UpstreamSpec::Name(_))) {
            bail!("listener `{name}`: key `upstream`: names (not addresses) cannot be combined with `sni`");
        }
        let (mut upstreams, mut names) = (Vec::new(), Vec::new());
        for u in self.upstream {
            match u {
                UpstreamSpec::Addr(a) => upstreams.push(a),
                UpstreamSpec::Name(n) if names.contains(&n) => bail!("listener `{name}`: key `upstream`: {n} is listed twice"),
                UpstreamSpec::Name(n) => names.push(n),
            }
        }
        if !groups.is_empty() {
            if !upstreams.is_empty() {
                if groups.iter().any(|(n, _)| *n == SniMatch::Any) {
                    bail!("listener `{name}`: keys `upstream` and `sni` \"*\" both say where other names go: keep one");
                }
                groups.push((SniMatch::Any, upstreams.clone()));
            }
            upstreams = Vec::new();
            for (_, ups) in &groups {
                for u in ups {
                    match upstreams.iter_mut().find(|o: &&mut Upstream| o.addr == u.addr) {
                        // One address in two groups: one upstream, checked once.
                        Some(o) if o.weight != u.weight => {
                            bail!("listener `{name}`: key `sni`: {} has two weights", u.addr)
                        }
                        Some(_) => {}
                        None => upstreams.push(*u),
                    }
                }
            }
        }
        if !reads_mqtt {
            let mqtt_only = [
                ("mqtt-connect-max", self.mqtt_connect_max.is_some()),
                ("mqtt-connect-timeout", self.mqtt_connect_timeout.is_some()),
                ("balance = \"client-id\"", self.balance == Some(Balance::ClientId)),
            ];
            if let Some((key, _)) = mqtt_only.iter().find(|(_, set)| *set) {
                bail!("listener `{name}`: key `{key}` applies to MQTT listeners only (protocol = \"mqtt\" or \"mqtt-ws\")");
            }
        }
        if is_ws && self.balance == Some(Balance::ClientId) {
            bail!(
                "listener `{name}`: key `balance`: \"client-id\" needs protocol = \"mqtt\": over WebSocket the \
                 client sends its CONNECT only after the broker has answered the upgrade, so the broker is \
                 chosen before the client ID is known (use \"source\")"
            );
        }
        if !is_ws {
            let ws_only = [
                ("ws-path", self.ws_path.is_some()),
                ("forwarded-for", self.forwarded_for.is_some()),
                ("forwarded-port", self.forwarded_port.is_some()),
                ("real-ip-header", self.real_ip_header.is_some()),
                ("real-ip-recursive", self.real_ip_recursive),
                ("set-real-ip-header", self.set_real_ip_header.is_some()),
                ("ws-header-max", self.ws_header_max.is_some()),
                ("ws-header-timeout", self.ws_header_timeout.is_some()),
            ];
            if let Some((key, _)) = ws_only.iter().find(|(_, set)| *set) {
                bail!("listener `{name}`: key `{key}` applies to WebSocket listeners only (protocol = \"ws\" or \"mqtt-ws\")");
            }
        }
        Ok(Listener {
            name,
            listen,
            upstreams,
            names,
            balance: self.balance.unwrap_or(Balance::RoundRobin),
            health: Health {
                check: self.health_check.unwrap_or(HealthCheck::Off),
                interval: self
                    .health_interval
                    .map_or(DEFAULT_HEALTH_INTERVAL, |d| d.0),
                rise: self.health_rise.unwrap_or(DEFAULT_HEALTH_RISE),
                fall: self.health_fall.unwrap_or(DEFAULT_HEALTH_FALL),
                http: (self.health_check == Some(HealthCheck::Http)).then(|| HttpCheck {
                    port: self.health_http_port,
                    path: self.health_http_path.clone().unwrap_or_else(|| "/".to_string()),
                    status: self.health_http_status.unwrap_or(200),
                }),
            },
            allow: self.allow,
            deny: self.deny,
            max_conns: self.max_conns,
            max_handshakes: self.max_handshakes.unwrap_or(DEFAULT_MAX_HANDSHAKES),
            rate_limit: RateLimit {
                per_source: self.rate_limit.map(|r| Rate::new(r, self.rate_limit_burst)),
                listener: self.max_connect_rate.map(|r| Rate::new(r, None)),
                prefix_v4: self.rate_limit_prefix_v4.unwrap_or(DEFAULT_RATE_PREFIX_V4),
                prefix_v6: self.rate_limit_prefix_v6.unwrap_or(DEFAULT_RATE_PREFIX_V6),
            },
            send_proxy: self.send_proxy.unwrap_or(SendProxy::Off),
            connect_timeout: self
                .connect_timeout
                .map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.0),
            accept_proxy: self.accept_proxy.unwrap_or(AcceptProxy::Off),
            trusted_proxies: self.trusted_proxy,
            proxy_passthrough: self.proxy_passthrough,
            proxy_timeout: self.proxy_timeout.map_or(DEFAULT_PROXY_TIMEOUT, |d| d.0),
            untrusted_proxy: self.untrusted_proxy.unwrap_or(UntrustedProxy::Ignore),
            ws: is_ws.then(|| WsOptions {
                path: match self.ws_path.as_deref() {
                    Some("*") => None,
                    Some(p) => Some(p.to_string()),
                    None => Some("/mqtt".to_string()),
                },
                forwarded_for: self.forwarded_for.unwrap_or(ForwardMode::Override),
                forwarded_port: self.forwarded_port.unwrap_or(ForwardMode::Override),
                real_ip_header: self.real_ip_header,
                real_ip_recursive: self.real_ip_recursive,
                set_real_ip_header: self.set_real_ip_header,
                header_max: self.ws_header_max.unwrap_or(DEFAULT_WS_HEADER_MAX),
                header_timeout: self
                    .ws_header_timeout
                    .map_or(DEFAULT_WS_HEADER_TIMEOUT, |d| d.0),
                no_extensions: reads_mqtt,
            }),
            tls: is_tls.then(|| TlsPassthrough {
                hello_max: self.tls_hello_max.unwrap_or(DEFAULT_TLS_HELLO_MAX),
                hello_timeout: self.tls_hello_timeout.map_or(DEFAULT_TLS_HELLO_TIMEOUT, |d| d.0),
                groups,
            }),
            mqtt: reads_mqtt.then(|| MqttOptions {
                connect_max: self.mqtt_connect_max.unwrap_or(DEFAULT_MQTT_CONNECT_MAX),
                connect_timeout: self
                    .mqtt_connect_timeout
                    .map_or(DEFAULT_MQTT_CONNECT_TIMEOUT, |d| d.0),
            }),
            terminate,
        })
    }

    /// The TLS keys: None without `tls-cert`; else every file read.
    fn terminate(&self, name: &str, protocol: Protocol, is_ws: bool) -> Result<Option<Terminate>> {
        if self.tls_cert.is_empty() {
            let with_cert = [
                ("tls-key", !self.tls_key.is_empty()),
                ("tls-min-version", self.tls_min_version.is_some()),
                ("alpn", self.alpn.is_some()),
                ("tls-client-ca", self.tls_client_ca.is_some()),
                ("tls-client-auth", self.tls_client_auth.is_some()),
                ("tls-handshake-timeout", self.tls_handshake_timeout.is_some()),
            ];
            if let Some((key, _)) = with_cert.iter().find(|(_, set)| *set) {
                bail!("listener `{name}`: key `{key}`: needs `tls-cert` (TLS terminated here)");
            }
            return Ok(None);
        }
        if protocol == Protocol::TlsPassthrough {
            bail!(
                "listener `{name}`: key `tls-cert`: a tls-passthrough listener passes TLS on without \
                 terminating it; to terminate, use protocol tcp, mqtt, ws or mqtt-ws"
            );
        }
        if self.tls_cert.len() != self.tls_key.len() {
            bail!(
                "listener `{name}`: keys `tls-cert` and `tls-key` go in pairs: {} certificates, {} keys",
                self.tls_cert.len(),
                self.tls_key.len()
            );
        }
        if self.tls_client_auth.is_some() && self.tls_client_ca.is_none() {
            bail!("listener `{name}`: key `tls-client-auth`: needs `tls-client-ca`");
        }
        if self.proxy_passthrough {
            bail!(
                "listener `{name}`: key `proxy-passthrough`: a terminating listener sends a header of its own, \
                 with this hop's TLS in it, not an earlier hop's"
            );
        }
        let handshake_timeout = self.tls_handshake_timeout.map_or(DEFAULT_TLS_HANDSHAKE_TIMEOUT, |d| d.0);
        if handshake_timeout.is_zero() {
            bail!("listener `{name}`: key `tls-handshake-timeout`: must be greater than zero");
        }
        let alpn = self.alpn.clone().unwrap_or_else(|| {
            vec![match is_ws {
                true => "http/1.1".to_string(),
                false => "mqtt".to_string(),
            }]
        });
        if let Some(p) = alpn.iter().find(|p| p.is_empty() || p.len() > 255) {
            bail!("listener `{name}`: key `alpn`: {p:?} is not an ALPN protocol name (1 to 255 bytes)");
        }
        let loaded = crate::tls::certs::load(crate::tls::certs::Settings {
            pairs: self.tls_cert.iter().cloned().zip(self.tls_key.iter().cloned()).collect(),
            min_version: self.tls_min_version.unwrap_or(MinVersion::Tls12),
            alpn,
            client_ca: self.tls_client_ca.clone(),
            client_auth: self.tls_client_auth.unwrap_or(ClientAuth::Required),
            handshake_timeout,
        });
        loaded.map(Some).with_context(|| format!("listener `{name}`: TLS"))
    }
}

/// Settings that can come from flags and override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub log_level: Option<log::LevelFilter>,
    pub log_format: Option<LogFormat>,
    pub resolv_conf: Option<PathBuf>,
    pub resolve_interval: Option<Duration>,
    pub offload: Option<OffloadMode>,
    pub handoff: Option<Handoff>,
    pub metrics: Option<SocketAddr>,
    pub drain_timeout: Option<Duration>,
    pub max_buffered: Option<u64>,
}

impl Config {
    /// Parses a TOML config. `origin` names the file in error messages.
    pub fn from_toml(text: &str, origin: &str, overrides: &Overrides) -> Result<Config> {
        let file: FileConfig =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        let listeners = file
            .listener
            .into_iter()
            .enumerate()
            .map(|(i, l)| l.resolve(i))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| anyhow::anyhow!("{origin}: {e:#}"))?;
        let config = Config {
            log_level: overrides
                .log_level
                .or(file.log_level.map(|l| l.0))
                .unwrap_or(log::LevelFilter::Info),
            log_format: overrides.log_format.or(file.log_format).unwrap_or_default(),
            resolv_conf: overrides.resolv_conf.clone().or(file.resolv_conf).unwrap_or_else(|| PathBuf::from(DEFAULT_RESOLV_CONF)),
            resolve_interval: overrides
                .resolve_interval
                .or(file.resolve_interval.map(|d| d.0))
                .unwrap_or(DEFAULT_RESOLVE_INTERVAL),
            offload: overrides
                .offload
                .or(file.offload)
                .unwrap_or(OffloadMode::Auto),
            handoff: overrides.handoff.or(file.handoff).unwrap_or_default(),
            metrics: overrides.metrics.or(file.metrics),
            drain_timeout: overrides
                .drain_timeout
                .or(file.drain_timeout.map(|d| d.0))
                .unwrap_or(DEFAULT_DRAIN_TIMEOUT),
            max_buffered: overrides
                .max_buffered
                .or(file.max_buffered.map(|b| b.as_u64())),
            listeners,
        };
        config
            .validate()
            .with_context(|| format!("{origin}: invalid configuration"))?;
        Ok(config)
    }

    pub fn from_file(path: &Path, overrides: &Overrides) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::from_toml(&text, &path.display().to_string(), overrides)
    }

    /// Checks what serde cannot: at least one listener, upstreams present,
    /// names and addresses unique, timeouts non-zero.
    pub fn validate(&self) -> Result<()> {
        if self.listeners.is_empty() {
            bail!("no listener: add a [[listener]] table with `listen` and `upstream`");
        }
        if self.resolve_interval.is_zero() {
            bail!("key `resolve-interval`: must be greater than zero");
        }
        for (i, l) in self.listeners.iter().enumerate() {
            let at = format!("listener `{}`", l.name);
            if l.upstreams.is_empty() && l.names.is_empty() {
                bail!("{at}: key `upstream`: at least one upstream address is required");
            }
            if l.upstreams.iter().map(|u| u.weight).chain(l.names.iter().map(|n| n.weight)).all(|w| w == 0) {
                bail!("{at}: key `upstream`: every weight is 0, so no upstream would take a client");
            }
            if l.health.interval.is_zero() {
                bail!("{at}: key `health-interval`: must be greater than zero");
            }
            if l.health.rise == 0 || l.health.fall == 0 {
                bail!("{at}: keys `health-rise` and `health-fall`: must be at least 1");
            }
            if let Some(h) = &l.health.http {
                // It goes into a request line: one token, no way to add a header.
                if !h.path.starts_with('/') || h.path.bytes().any(|b| b <= b' ' || b == 0x7f) {
                    bail!("{at}: key `health-http-path`: {:?} is not an absolute path without spaces or control characters", h.path);
                }
                if !(100..=599).contains(&h.status) {
                    bail!("{at}: key `health-http-status`: {} is not an HTTP status", h.status);
                }
                if h.port == Some(0) {
                    bail!("{at}: key `health-http-port`: must not be 0");
                }
            }
            if l.max_handshakes == 0 {
                bail!("{at}: key `max-handshakes`: 0 would refuse every client");
            }
            if l.max_conns == Some(0) {
                bail!("{at}: key `max-conns`: 0 would refuse every client (leave it out for no limit)");
            }
            if l.connect_timeout.is_zero() {
                bail!("{at}: key `connect-timeout`: must be greater than zero");
            }
            if l.proxy_timeout.is_zero() {
                bail!("{at}: key `proxy-timeout`: must be greater than zero");
            }
            if l.proxy_passthrough && l.accept_proxy == AcceptProxy::Off {
                bail!("{at}: key `proxy-passthrough`: needs `accept-proxy` (there is no inbound header to pass through)");
            }
            if let Some(ws) = &l.ws {
                if ws.real_ip_recursive && ws.real_ip_header.is_none() {
                    bail!("{at}: key `real-ip-recursive`: needs `real-ip-header`");
                }
                if ws.real_ip_header.is_some() && l.trusted_proxies.is_empty() {
                    bail!("{at}: key `real-ip-header`: needs `trusted-proxy` (whose headers to believe)");
                }
                for (key, name) in [
                    ("real-ip-header", &ws.real_ip_header),
                    ("set-real-ip-header", &ws.set_real_ip_header),
                ] {
                    if let Some(n) = name {
                        if n.is_empty()
                            || !n
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                        {
                            bail!("{at}: key `{key}`: `{n}` is not a header name");
                        }
                    }
                }
                if let Some(p) = &ws.path {
                    if !p.starts_with('/') {
                        bail!(
                            "{at}: key `ws-path`: `{p}` must start with / (or be * for any path)"
                        );
                    }
                }
                if !(1024..=1 << 20).contains(&ws.header_max) {
                    bail!("{at}: key `ws-header-max`: must be between 1024 and 1048576 bytes");
                }
                if ws.header_timeout.is_zero() {
                    bail!("{at}: key `ws-header-timeout`: must be greater than zero");
                }
            }
            let r = &l.rate_limit;
            if r.per_source.is_some_and(|r| r.burst == 0) {
                bail!("{at}: key `rate-limit-burst`: must be at least 1");
            }
            if !(1..=32).contains(&r.prefix_v4) {
                bail!("{at}: key `rate-limit-prefix-v4`: must be between 1 and 32");
            }
            if !(1..=128).contains(&r.prefix_v6) {
                bail!("{at}: key `rate-limit-prefix-v6`: must be between 1 and 128");
            }
            if let Some(t) = &l.tls {
                if !(512..=64 * 1024).contains(&t.hello_max) {
                    bail!("{at}: key `tls-hello-max`: must be between 512 and 65536 bytes");
                }
                if t.hello_timeout.is_zero() {
                    bail!("{at}: key `tls-hello-timeout`: must be greater than zero");
                }
            }
            if let Some(m) = &l.mqtt {
                if !MQTT_CONNECT_MAX_RANGE.contains(&m.connect_max) {
                    bail!(
                        "{at}: key `mqtt-connect-max`: must be between {} and {} bytes",
                        MQTT_CONNECT_MAX_RANGE.start(),
                        MQTT_CONNECT_MAX_RANGE.end()
                    );
                }
                if m.connect_timeout.is_zero() {
                    bail!("{at}: key `mqtt-connect-timeout`: must be greater than zero");
                }
            }
            if l.accept_proxy != AcceptProxy::Off && l.trusted_proxies.is_empty() {
                bail!("{at}: key `trusted-proxy`: `accept-proxy` needs at least one trusted CIDR, or every header would be thrown away");
            }
            if l.upstreams.iter().any(|u| u.addr == l.listen) {
                bail!(
                    "{at}: key `upstream`: {} is the listener's own address",
                    l.listen
                );
            }
            for (j, u) in l.upstreams.iter().enumerate() {
                if l.upstreams[..j].iter().any(|o| o.addr == u.addr) {
                    bail!("{at}: key `upstream`: {} is listed twice (use weight=N)", u.addr);
                }
            }
            for other in &self.listeners[..i] {
                if other.name == l.name {
                    bail!("{at}: key `name`: used by another listener");
                }
                if other.listen == l.listen {
                    bail!(
                        "{at}: key `listen`: {} is also used by listener `{}`",
                        l.listen,
                        other.name
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::from_toml(text, "test.toml", &Overrides::default())
    }

    fn err(text: &str) -> String {
        format!("{:#}", parse(text).unwrap_err())
    }

    /// A listener with only the required keys, for tests to add one to.
    const L: &str = "[[listener]]\nlisten = \"127.0.0.1:1\"\nupstream = [\"127.0.0.1:2\"]\n";

    /// Each config must be refused with an error containing every word.
    fn assert_refused<'a>(cases: impl IntoIterator<Item = (String, &'a [&'a str])>) {
        for (text, words) in cases {
            let e = err(&text);
            assert!(words.iter().all(|w| e.contains(w)), "{text:?}: {e}");
        }
    }

    #[test]
    fn full_config() {
        let c = parse(
            r#"
            log-level = "debug"
            offload = "userspace"
            [[listener]]
            name = "mqtt"
            listen = "127.0.0.1:1883"
            upstream = ["127.0.0.1:11883", "[::1]:11884"]
            send-proxy = "v2"
            connect-timeout = "250ms"
            [[listener]]
            listen = "[::]:2883"
            upstream = ["10.0.0.1:1883"]
            "#,
        )
        .unwrap();
        assert_eq!(c.log_level, log::LevelFilter::Debug);
        assert_eq!(c.offload, OffloadMode::Userspace);
        assert_eq!(c.listeners.len(), 2);
        let l = &c.listeners[0];
        assert_eq!(l.name, "mqtt");
        assert_eq!(l.listen, "127.0.0.1:1883".parse().unwrap());
        assert_eq!(l.upstreams[1].addr, "[::1]:11884".parse().unwrap());
        assert_eq!(l.send_proxy, SendProxy::V2);
        assert_eq!(l.connect_timeout, Duration::from_millis(250));
        let l = &c.listeners[1];
        assert_eq!(l.name, "listener1");
        assert_eq!(l.send_proxy, SendProxy::Off);
        assert_eq!(l.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(c.log_level, log::LevelFilter::Debug);
    }

    #[test]
    fn defaults_and_overrides() {
        let text = "[[listener]]\nlisten = \"127.0.0.1:1\"\nupstream = [\"127.0.0.1:2\"]\n";
        let c = parse(text).unwrap();
        assert_eq!(c.offload, OffloadMode::Auto);
        assert_eq!(c.log_level, log::LevelFilter::Info);
        let o = Overrides {
            log_level: Some(log::LevelFilter::Trace),
            offload: Some(OffloadMode::Sockmap),
            ..Overrides::default()
        };
        let c = Config::from_toml(text, "t", &o).unwrap();
        assert_eq!(c.offload, OffloadMode::Sockmap);
        assert_eq!(c.log_level, log::LevelFilter::Trace);
    }

    #[test]
    fn multi_tier_keys() {
        let keys = r#"
            accept-proxy = "auto"
            trusted-proxy = ["10.0.0.0/8", "fd00::/8", "192.168.1.7/32"]
            proxy-passthrough = true
            proxy-timeout = "1500ms"
            untrusted-proxy = "reject"
            "#;
        let c = parse(&format!("{L}{keys}")).unwrap();
        let l = &c.listeners[0];
        assert_eq!(l.accept_proxy, AcceptProxy::Auto);
        assert_eq!(l.trusted_proxies.len(), 3);
        assert_eq!(l.trusted_proxies[1], "fd00::/8".parse::<IpNet>().unwrap());
        assert!(l.proxy_passthrough);
        assert_eq!(l.proxy_timeout, Duration::from_millis(1500));
        assert_eq!(l.untrusted_proxy, UntrustedProxy::Reject);
        let c = parse(L).unwrap();
        let l = &c.listeners[0];
        assert_eq!(l.accept_proxy, AcceptProxy::Off);
        assert_eq!(l.proxy_timeout, DEFAULT_PROXY_TIMEOUT);
        assert_eq!(l.untrusted_proxy, UntrustedProxy::Ignore);
    }

    #[test]
    fn multi_tier_errors_name_the_key() {
        let cases: [(String, &[&str]); 7] = [
            (format!("{L}accept-proxy = \"v3\"\n"), &["accept-proxy", "auto"]),
            (format!("{L}accept-proxy = \"auto\"\ntrusted-proxy = [\"10.0.0.0/33\"]\n"), &["trusted-proxy"]),
            (format!("{L}accept-proxy = \"auto\"\n"), &["`trusted-proxy`", "at least one"]),
            (format!("{L}proxy-passthrough = true\n"), &["`proxy-passthrough`", "accept-proxy"]),
            (format!("{L}untrusted-proxy = \"drop\"\n"), &["untrusted-proxy", "reject"]),
            (format!("{L}accept-proxy = \"v1\"\ntrusted-proxy = [\"10.0.0.1/32\"]\nproxy-timeout = \"0s\"\n"), &["`proxy-timeout`"]),
            ("[[listener]]\nupstream = [\"127.0.0.1:2\"]\n".into(), &["`listen`", "required"]),
        ];
        assert_refused(cases);
    }

    #[test]
    fn websocket_keys() {
        let c = parse(
            r#"
            [[listener]]
            listen = "127.0.0.1:8083"
            upstream = ["127.0.0.1:18083"]
            protocol = "ws"
            ws-path = "/mqtt"
            forwarded-for = "append"
            forwarded-port = "append"
            trusted-proxy = ["10.0.0.0/8"]
            real-ip-header = "X-Forwarded-For"
            real-ip-recursive = true
            set-real-ip-header = "X-Real-IP"
            ws-header-max = 8192
            ws-header-timeout = "2s"
            [[listener]]
            listen = "127.0.0.1:8084"
            upstream = ["127.0.0.1:18083"]
            protocol = "ws"
            ws-path = "*"
            "#,
        )
        .unwrap();
        let ws = c.listeners[0].ws.as_ref().unwrap();
        assert_eq!(ws.path.as_deref(), Some("/mqtt"));
        assert_eq!(ws.forwarded_for, ForwardMode::Append);
        assert_eq!(ws.forwarded_port, ForwardMode::Append);
        assert_eq!(ws.real_ip_header.as_deref(), Some("X-Forwarded-For"));
        assert!(ws.real_ip_recursive);
        assert_eq!(ws.set_real_ip_header.as_deref(), Some("X-Real-IP"));
        assert_eq!(ws.header_max, 8192);
        assert_eq!(ws.header_timeout, Duration::from_secs(2));
        let ws = c.listeners[1].ws.as_ref().unwrap();
        assert_eq!(ws.path, None);
        assert_eq!(ws.forwarded_for, ForwardMode::Override);
        assert_eq!(ws.header_max, DEFAULT_WS_HEADER_MAX);
        assert!(c.listeners.iter().all(|l| l.send_proxy == SendProxy::Off));
        let tcp = parse("[[listener]]\nlisten = \"127.0.0.1:1\"\nupstream = [\"127.0.0.1:2\"]\n")
            .unwrap();
        assert!(tcp.listeners[0].ws.is_none());
    }

    #[test]
    fn websocket_errors_name_the_key() {
        let ws = format!("{L}protocol = \"ws\"\n");
        let cases: [(String, &[&str]); 8] = [
            (format!("{L}ws-path = \"/x\"\n"), &["`ws-path`", "WebSocket listeners only"]),
            (format!("{ws}real-ip-recursive = true\n"), &["`real-ip-recursive`", "real-ip-header"]),
            (format!("{ws}real-ip-header = \"X-Forwarded-For\"\n"), &["`real-ip-header`", "trusted-proxy"]),
            (format!("{ws}set-real-ip-header = \"X Real\"\n"), &["`set-real-ip-header`"]),
            (format!("{ws}ws-path = \"mqtt\"\n"), &["`ws-path`"]),
            (format!("{ws}ws-header-max = 10\n"), &["`ws-header-max`"]),
            (format!("{ws}forwarded-for = \"replace\"\n"), &["forwarded-for", "append"]),
            (format!("{L}protocol = \"sse\"\n"), &["protocol", "ws"]),
        ];
        assert_refused(cases);
    }

    #[test]
    fn mqtt_keys() {
        let c = parse(&format!(
            "{L}protocol = \"mqtt\"\nbalance = \"client-id\"\nmqtt-connect-max = 4096\nmqtt-connect-timeout = \"2s\"\n"
        ))
        .unwrap();
        let l = &c.listeners[0];
        assert_eq!(l.balance, Balance::ClientId);
        assert_eq!(
            l.mqtt,
            Some(MqttOptions {
                connect_max: 4096,
                connect_timeout: Duration::from_secs(2)
            })
        );
        assert!(l.ws.is_none());
        let m = parse(&format!("{L}protocol = \"mqtt\"\n")).unwrap().listeners[0].mqtt.unwrap();
        assert_eq!((m.connect_max, m.connect_timeout), (DEFAULT_MQTT_CONNECT_MAX, DEFAULT_MQTT_CONNECT_TIMEOUT));
        assert!(parse(L).unwrap().listeners[0].mqtt.is_none());
        let l = &parse(&format!("{L}protocol = \"mqtt-ws\"\nws-path = \"/x\"\n")).unwrap().listeners[0];
        assert!(l.mqtt.is_some() && l.ws.as_ref().is_some_and(|w| w.no_extensions && w.path.as_deref() == Some("/x")));
        let ws = &parse(&format!("{L}protocol = \"ws\"\n")).unwrap().listeners[0];
        assert!(ws.mqtt.is_none() && !ws.ws.as_ref().unwrap().no_extensions);
    }

    #[test]
    fn rate_limit_keys() {
        let c = parse(&format!(
            "{L}rate-limit = \"600/m\"\nrate-limit-burst = 30\nrate-limit-prefix-v6 = 56\nmax-connect-rate = \"2.5/s\"\n"
        ))
        .unwrap();
        let r = c.listeners[0].rate_limit;
        assert_eq!(r.per_source, Some(Rate { per_sec: 10.0, burst: 30 }));
        assert_eq!(r.listener, Some(Rate { per_sec: 2.5, burst: 3 }));
        assert_eq!((r.prefix_v4, r.prefix_v6), (32, 56));
        assert_eq!(r.source_of("2001:db8:1:2ff::7".parse().unwrap()), "2001:db8:1:200::/56".parse::<IpNet>().unwrap());
        assert_eq!(r.source_of("::ffff:192.0.2.7".parse().unwrap()), "192.0.2.7/32".parse::<IpNet>().unwrap());
        let none = parse(L).unwrap().listeners[0].rate_limit;
        assert_eq!((none.per_source, none.listener), (None, None));
        let cases: [(String, &[&str]); 5] = [
            (format!("{L}rate-limit = \"10\"\n"), &["rate-limit", "20/s"]),
            (format!("{L}rate-limit = \"0/s\"\n"), &["rate-limit", "greater than zero"]),
            (format!("{L}rate-limit-burst = 5\n"), &["`rate-limit-burst`", "needs `rate-limit`"]),
            (format!("{L}rate-limit = \"1/s\"\nrate-limit-burst = 0\n"), &["`rate-limit-burst`", "at least 1"]),
            (format!("{L}rate-limit = \"1/s\"\nrate-limit-prefix-v4 = 33\n"), &["`rate-limit-prefix-v4`"]),
        ];
        assert_refused(cases);
    }

    /// A certificate for `name` and its key, written to `dir`.
    fn cert_files(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }

    #[test]
    fn upstream_names() {
        let c = parse(
            "resolve-interval = \"30s\"\n[[listener]]\nlisten = \"127.0.0.1:1\"\n\
             upstream = [\"emqx-0.emqx-headless:1883\", \"Broker.Example:8883 weight=2\", \"10.0.0.1:1883\"]\n",
        )
        .unwrap();
        let l = &c.listeners[0];
        assert_eq!(l.upstreams.len(), 1);
        assert_eq!(
            l.names,
            [
                NamedUpstream { host: "emqx-0.emqx-headless".into(), port: 1883, weight: 1 },
                NamedUpstream { host: "broker.example".into(), port: 8883, weight: 2 },
            ]
        );
        assert_eq!((c.resolve_interval, c.resolv_conf.to_str()), (Duration::from_secs(30), Some("/etc/resolv.conf")));
        let only_names = parse("[[listener]]\nlisten = \"127.0.0.1:1\"\nupstream = [\"b.example:1883\"]\n").unwrap();
        assert!(only_names.listeners[0].upstreams.is_empty());
        let up = |u: &str| format!("[[listener]]\nlisten = \"127.0.0.1:1\"\nupstream = [\"{u}\"]\n");
        assert_refused([
            (up("b.example"), &["b.example", "not an address"][..]),
            (up("b.example:0"), &["b.example:0"]),
            (up("b_x.example:1883"), &["b_x.example"]),
            (up("-b.example:1883"), &["-b.example"]),
            (up("1.2.3:1883"), &["1.2.3:1883"]),
            ("[[listener]]\nlisten = \"127.0.0.1:1\"\nupstream = [\"b.example:1\", \"B.example:1\"]\n".to_string(), &["listed twice"]),
            ("[[listener]]\nlisten = \"127.0.0.1:1\"\nupstream = [\"b.example:1 weight=0\"]\n".to_string(), &["every weight is 0"]),
            (format!("resolve-interval = \"0s\"\n{}", up("b.example:1")), &["`resolve-interval`"]),
        ]);
    }

    #[test]
    fn http_health_check_keys() {
        let c = parse(&format!(
            "{L}health-check = \"http\"\nhealth-http-port = 18083\nhealth-http-path = \"/api/v5/load_rebalance/availability_check\"\n"
        ))
        .unwrap();
        let h = c.listeners[0].health.http.clone().unwrap();
        assert_eq!((h.port, h.path.as_str(), h.status), (Some(18083), "/api/v5/load_rebalance/availability_check", 200));
        let d = parse(&format!("{L}health-check = \"http\"\n")).unwrap();
        assert_eq!(d.listeners[0].health.http, Some(HttpCheck { port: None, path: "/".into(), status: 200 }));
        assert_refused([
            (format!("{L}health-http-path = \"/x\"\n"), &["`health-http-path`", "health-check = \"http\""][..]),
            (format!("{L}health-check = \"http\"\nhealth-http-path = \"x\"\n"), &["`health-http-path`"]),
            (format!("{L}health-check = \"http\"\nhealth-http-path = \"/a b\"\n"), &["`health-http-path`"]),
            (format!("{L}health-check = \"http\"\nhealth-http-path = \"/a\\r\\nX: y\"\n"), &["`health-http-path`"]),
            (format!("{L}health-check = \"http\"\nhealth-http-status = 42\n"), &["`health-http-status`"]),
            (format!("{L}health-check = \"http\"\nhealth-http-port = 0\n"), &["`health-http-port`"]),
        ]);
    }

    #[test]
    fn tls_termination_keys() {
        let dir = std::env::temp_dir().join(format!("splicer-config-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, a_key) = cert_files(&dir, "a.example");
        let (b, b_key) = cert_files(&dir, "b.example");
        let tls = format!("{L}tls-cert = [\"{}\", \"{}\"]\ntls-key = [\"{}\", \"{}\"]\n", a.display(), b.display(), a_key.display(), b_key.display());
        let c = parse(&format!("{tls}protocol = \"mqtt\"\ntls-min-version = \"1.3\"\n")).unwrap();
        let t = c.listeners[0].terminate.as_ref().unwrap();
        assert_eq!((t.settings.min_version, t.settings.alpn.clone()), (MinVersion::Tls13, vec!["mqtt".to_string()]));
        assert_eq!(t.certs.iter().map(|c| c.names.clone()).collect::<Vec<_>>(), [["a.example"], ["b.example"]]);
        assert!(t.server.alpn_protocols == [b"mqtt".to_vec()]);
        // --check prints the config: never a key.
        let key_pem = std::fs::read_to_string(&a_key).unwrap();
        let shown = format!("{c:#?}");
        let key_line = key_pem.lines().nth(1).unwrap();
        assert!(!shown.contains("PRIVATE KEY") && !shown.contains(key_line), "{shown}");
        // WebSocket listeners offer http/1.1; `alpn = []` offers nothing.
        let ws = parse(&format!("{tls}protocol = \"ws\"\n")).unwrap();
        assert_eq!(ws.listeners[0].terminate.as_ref().unwrap().settings.alpn, ["http/1.1"]);
        let none = parse(&format!("{tls}alpn = []\n")).unwrap();
        assert!(none.listeners[0].terminate.as_ref().unwrap().settings.alpn.is_empty());
        // The same paths with new contents are a changed listener (SIGHUP
        // reloads it); the same contents are not.
        let before = parse(&tls).unwrap();
        assert_eq!(before, parse(&tls).unwrap());
        let (c2, k2) = cert_files(&dir, "a.example");
        assert_eq!((c2, k2), (a.clone(), a_key.clone()));
        assert_ne!(before, parse(&tls).unwrap());
        let one = |cert: &Path, key: &Path| format!("{L}tls-cert = \"{}\"\ntls-key = \"{}\"\n", cert.display(), key.display());
        assert_refused([
            (one(&a, &b_key), &["a.example.crt", "b.example.key"][..]),
            (one(&a, &dir.join("missing.key")), &["missing.key"]),
            (one(&a_key, &a_key), &["a.example.key", "no certificate"]),
            (format!("{L}tls-key = \"{}\"\n", a_key.display()), &["`tls-key`", "needs `tls-cert`"]),
            (format!("{L}tls-cert = [\"{}\", \"{}\"]\ntls-key = \"{}\"\n", a.display(), b.display(), a_key.display()), &["pairs", "2 certificates, 1 keys"]),
            (format!("{}tls-client-auth = \"optional\"\n", one(&a, &a_key)), &["`tls-client-auth`", "needs `tls-client-ca`"]),
            (format!("{}protocol = \"tls-passthrough\"\n", one(&a, &a_key)), &["tls-passthrough", "terminate"]),
            (format!("{}proxy-passthrough = true\n", one(&a, &a_key)), &["`proxy-passthrough`"]),
            (format!("{}alpn = [\"\"]\n", one(&a, &a_key)), &["`alpn`"]),
            (format!("{}tls-client-ca = \"{}\"\n", one(&a, &a_key), a_key.display()), &["a.example.key"]),
        ]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tls_passthrough_keys() {
        let c = parse(
            r#"
            [[listener]]
            listen = "127.0.0.1:8883"
            protocol = "tls-passthrough"
            tls-hello-max = 4096
            sni = { "A.example" = ["10.0.0.1:8883", "10.0.0.2:8883 weight=2"], "*.b.example" = ["10.0.0.3:8883"], "*" = ["10.0.0.1:8883"] }
            "#,
        )
        .unwrap();
        let l = &c.listeners[0];
        let t = l.tls.as_ref().unwrap();
        assert_eq!(t.hello_max, 4096);
        assert_eq!(t.hello_timeout, DEFAULT_TLS_HELLO_TIMEOUT);
        let names: Vec<String> = t.groups.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(names, ["*", "*.b.example", "a.example"], "lowercased, in the table's order");
        let addrs: Vec<String> = l.upstreams.iter().map(ToString::to_string).collect();
        assert_eq!(addrs, ["10.0.0.1:8883", "10.0.0.3:8883", "10.0.0.2:8883 weight=2"], "each once");
        // `upstream` is the `*` group when there is none.
        let c = parse("[[listener]]\nlisten = \"127.0.0.1:1\"\nupstream = [\"127.0.0.1:2\"]\nprotocol = \"tls-passthrough\"\nsni = { \"a.example\" = [\"127.0.0.1:3\"] }\n").unwrap();
        let t = c.listeners[0].tls.as_ref().unwrap();
        assert_eq!(t.groups[1].0, SniMatch::Any);
        assert_eq!(c.listeners[0].upstreams.len(), 2);
        let tls = "[[listener]]\nlisten = \"127.0.0.1:1\"\nprotocol = \"tls-passthrough\"\n";
        let cases: [(String, &[&str]); 10] = [
            (format!("{L}sni = {{ \"a.example\" = [\"127.0.0.1:3\"] }}\n"), &["`sni`", "TLS passthrough listeners only"]),
            (format!("{tls}sni = {{ \"a b\" = [\"127.0.0.1:3\"] }}\n"), &["a b", "server name"]),
            (format!("{tls}sni = {{ \"*.\" = [\"127.0.0.1:3\"] }}\n"), &["server name"]),
            (format!("{tls}upstream = [\"127.0.0.1:2\"]\nsni = {{ \"*\" = [\"127.0.0.1:3\"] }}\n"), &["`upstream`", "keep one"]),
            (format!("{tls}sni = {{ \"a.example\" = [\"127.0.0.1:3\"], \"b.example\" = [\"127.0.0.1:3 weight=2\"] }}\n"), &["two weights"]),
            (format!("{tls}upstream = [\"127.0.0.1:2\"]\ntls-hello-max = 100\n"), &["`tls-hello-max`"]),
            (format!("{tls}sni = {{ \"a.example\" = [\"127.0.0.1:3\", \"127.0.0.1:3\"] }}\n"), &["listed twice", "a.example"]),
            (format!("{tls}sni = {{ \"a.example\" = [\"127.0.0.1:3 weight=0\"], \"*\" = [\"127.0.0.1:4\"] }}\n"), &["every weight", "a.example"]),
            (format!("{tls}upstream = [\"127.0.0.1:2\"]\nhealth-check = \"mqtt\"\n"), &["`health-check`", "tcp"]),
            (format!("{tls}sni = {{ \"a.example\" = [] }}\n"), &["a.example", "no upstream"]),
        ];
        assert_refused(cases);
    }

    #[test]
    fn mqtt_errors_name_the_key() {
        let mqtt = format!("{L}protocol = \"mqtt\"\n");
        let cases: [(String, &[&str]); 6] = [
            (format!("{L}balance = \"client-id\"\n"), &["client-id", "MQTT listeners only"]),
            (format!("{L}protocol = \"mqtt-ws\"\nbalance = \"client-id\"\n"), &["`balance`", "after the broker has answered"]),
            (format!("{L}protocol = \"ws\"\nmqtt-connect-max = 4096\n"), &["`mqtt-connect-max`", "MQTT listeners only"]),
            (format!("{L}mqtt-connect-timeout = \"1s\"\n"), &["`mqtt-connect-timeout`"]),
            (format!("{mqtt}mqtt-connect-max = 10\n"), &["`mqtt-connect-max`", "between"]),
            (format!("{mqtt}mqtt-connect-timeout = \"0s\"\n"), &["`mqtt-connect-timeout`", "greater than zero"]),
        ];
        assert_refused(cases);
    }

    #[test]
    fn operations_keys() {
        let c = parse(
            r#"
            metrics = "127.0.0.1:9100"
            drain-timeout = "10s"
            max-buffered = "256MiB"
            [[listener]]
            listen = "127.0.0.1:1"
            upstream = ["127.0.0.1:2", "127.0.0.1:3 weight=5", "[::1]:4 weight=0"]
            balance = "least-conn"
            health-check = "mqtt"
            health-interval = "500ms"
            health-rise = 1
            health-fall = 2
            allow = ["10.0.0.0/8"]
            deny = ["10.1.0.0/16"]
            max-conns = 1000
            "#,
        )
        .unwrap();
        assert_eq!(c.metrics, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(c.drain_timeout, Duration::from_secs(10));
        assert_eq!(c.max_buffered, Some(256 << 20));
        let l = &c.listeners[0];
        let weights: Vec<u32> = l.upstreams.iter().map(|u| u.weight).collect();
        assert_eq!(weights, [1, 5, 0]);
        assert_eq!(l.balance, Balance::LeastConn);
        assert_eq!(
            l.health,
            Health {
                check: HealthCheck::Mqtt,
                interval: Duration::from_millis(500),
                rise: 1,
                fall: 2,
                http: None,
            }
        );
        assert_eq!(l.allow, ["10.0.0.0/8".parse::<IpNet>().unwrap()]);
        assert_eq!(l.deny, ["10.1.0.0/16".parse::<IpNet>().unwrap()]);
        assert_eq!(l.max_conns, Some(1000));
        let d = parse("[[listener]]\nlisten = \"127.0.0.1:1\"\nupstream = [\"127.0.0.1:2\"]\n").unwrap();
        assert_eq!(d.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
        assert_eq!((d.metrics, d.max_buffered), (None, None));
        let l = &d.listeners[0];
        assert_eq!((l.balance, l.health.check, l.max_conns), (Balance::RoundRobin, HealthCheck::Off, None));
        assert_eq!((l.health.rise, l.health.fall, l.health.interval), (2, 3, Duration::from_secs(2)));
    }

    #[test]
    fn operations_errors_name_the_key() {
        let with = |ups: &str, extra: &str| format!("[[listener]]\nlisten = \"127.0.0.1:1\"\nupstream = [{ups}]\n{extra}\n");
        let one = "\"127.0.0.1:2\"";
        let cases: [(String, &[&str]); 9] = [
            (with("\"127.0.0.1:2 weight=x\"", ""), &["weight=N"]),
            (with("\"127.0.0.1:2 weight=257\"", ""), &["weight=N"]),
            (with("\"127.0.0.1:2 weight=0\"", ""), &["`upstream`", "every weight is 0"]),
            (with("\"127.0.0.1:2\", \"127.0.0.1:2 weight=2\"", ""), &["listed twice"]),
            (with(one, "balance = \"random\""), &["random"]),
            (with(one, "health-fall = 0"), &["`health-fall`"]),
            (with(one, "health-interval = \"0s\""), &["`health-interval`"]),
            (with(one, "max-conns = 0"), &["`max-conns`"]),
            (with(one, "allow = [\"10.0.0.300/8\"]"), &["allow"]),
        ];
        assert_refused(cases);
    }

    #[test]
    fn bundled_config_parses() {
        let text = include_str!("../../splicer.toml");
        let c = parse(text).unwrap();
        assert!(!c.listeners.is_empty());
    }

    #[test]
    fn errors_name_the_key() {
        let same_listen = "[[listener]]\nname=\"a\"\nlisten = \"127.0.0.1:1\"\nupstream = [\"127.0.0.1:2\"]\n[[listener]]\nname=\"b\"\nlisten = \"127.0.0.1:1\"\nupstream = [\"127.0.0.1:2\"]\n";
        let cases: [(String, &[&str]); 11] = [
            (format!("{L}send-proxy = \"v3\"\n"), &["send-proxy", "v3", "v1"]),
            (format!("{L}sendproxy = \"v1\"\n"), &["unknown field `sendproxy`"]),
            ("[[listener]]\nlisten = \"localhost\"\nupstream = [\"127.0.0.1:2\"]\n".into(), &["listen", "invalid socket address"]),
            ("[[listener]]\nlisten = \"127.0.0.1:1\"\n".into(), &["`upstream`", "at least one"]),
            (format!("{L}connect-timeout = \"soon\"\n"), &["connect-timeout", "not a duration"]),
            (format!("{L}connect-timeout = \"0s\"\n"), &["`connect-timeout`", "greater than zero"]),
            (format!("log-level = \"loud\"\n{L}"), &["log-level", "not a log level"]),
            (format!("offload = \"xdp\"\n{L}"), &["offload", "sockmap"]),
            (String::new(), &["no listener"]),
            (same_listen.into(), &["`listen`", "also used by listener `a`"]),
            ("[[listener]]\nlisten = \"127.0.0.1:1\"\nupstream = [\"127.0.0.1:1\"]\n".into(), &["own address"]),
        ];
        assert_refused(cases);
        let e = err(&format!("{L}{L}"));
        assert!(e.contains("`name`") || e.contains("`listen`"), "{e}");
    }
}
