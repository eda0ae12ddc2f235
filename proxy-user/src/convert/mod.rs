//! `splicer convert-nginx FILE`: an nginx config of the kind the EMQX guide
//! uses, printed as the equivalent splicer.toml. `nginx` reads the config
//! into `Draft` listeners; this module writes them out, each with where it
//! came from and what behaves differently, and names every directive that
//! was not translated (in the file, and on stderr).
mod nginx;

use std::{fmt, net::SocketAddr, path::Path, path::PathBuf};

use anyhow::{bail, Context as _, Result};
use ipnet::IpNet;
use serde::Serialize;

use crate::config::{AcceptProxy, Balance, ClientAuth, Dur, ForwardMode, MinVersion, Protocol, SendProxy};

/// One listener as the converter writes it: only the keys it can set, in
/// the order a reader expects them. Unset keys keep splicer's defaults.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Draft {
    pub name: String,
    pub listen: SocketAddr,
    pub protocol: Protocol,
    /// `ADDR`, `NAME:PORT`, with ` weight=N` when not 1.
    pub upstream: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance: Option<Balance>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Dur>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_proxy: Option<SendProxy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accept_proxy: Option<AcceptProxy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_timeout: Option<Dur>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxy: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<IpNet>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ws_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarded_for: Option<ForwardMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarded_port: Option<ForwardMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub real_ip_header: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub real_ip_recursive: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set_real_ip_header: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tls_cert: Vec<PathBuf>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tls_key: Vec<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_min_version: Option<MinVersion>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_auth: Option<ClientAuth>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_handshake_timeout: Option<Dur>,
}

impl Draft {
    fn new(name: String, listen: SocketAddr, protocol: Protocol) -> Draft {
        Draft {
            name,
            listen,
            protocol,
            upstream: Vec::new(),
            balance: None,
            connect_timeout: None,
            send_proxy: None,
            accept_proxy: None,
            proxy_timeout: None,
            trusted_proxy: Vec::new(),
            allow: Vec::new(),
            deny: Vec::new(),
            ws_path: None,
            forwarded_for: None,
            forwarded_port: None,
            real_ip_header: None,
            real_ip_recursive: false,
            set_real_ip_header: None,
            tls_cert: Vec::new(),
            tls_key: Vec::new(),
            tls_min_version: None,
            tls_client_ca: None,
            tls_client_auth: None,
            tls_handshake_timeout: None,
        }
    }
}

/// A listener and what a reader of the output should know about it.
#[derive(Debug)]
pub struct Converted {
    /// Where it came from: `stream server (line 6), listen 1883`.
    pub origin: String,
    /// The line of the nginx server it came from.
    pub line: usize,
    /// Where splicer behaves differently from the nginx it replaces.
    pub notes: Vec<String>,
    pub draft: Draft,
}

/// A directive, or a parameter of one, that has no splicer equivalent.
#[derive(Debug, PartialEq)]
pub struct Skipped {
    pub line: usize,
    /// The directive as written, shortened.
    pub text: String,
    pub why: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: `{}`: {}", self.line, self.text, self.why)
    }
}

/// What one nginx config turned into.
#[derive(Debug)]
pub struct Conversion {
    pub listeners: Vec<Converted>,
    pub skipped: Vec<Skipped>,
}

impl Conversion {
    /// The splicer.toml: a header naming what was not translated, then one
    /// `[[listener]]` table per listener, each after its comments.
    pub fn to_toml(&self, source: &str) -> Result<String> {
        #[derive(Serialize)]
        struct One<'a> {
            listener: [&'a Draft; 1],
        }
        let mut out = comment(&format!(
            "splicer.toml converted from {source} by `splicer convert-nginx`.\n\
             Check it with `splicer --check --config FILE` before use."
        ));
        if !self.skipped.is_empty() {
            out.push_str("#\n# Not translated:\n");
            for s in &self.skipped {
                out.push_str(&comment(&format!("- {s}")));
            }
        }
        for l in &self.listeners {
            out.push('\n');
            out.push_str(&comment(&format!("From the {}.", l.origin)));
            for n in &l.notes {
                out.push_str(&comment(&format!("- {n}")));
            }
            out.push_str(&toml::to_string(&One { listener: [&l.draft] })?);
        }
        Ok(out)
    }
}

/// `text` as comment lines (a note may hold a newline), its control
/// characters escaped: TOML allows none in a comment.
fn comment(text: &str) -> String {
    text.lines().map(|l| format!("# {}\n", printable(l))).collect()
}

/// `s` with control characters written as `\u{..}` escapes.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| match c.is_control() {
            true => c.escape_unicode().to_string(),
            false => c.to_string(),
        })
        .collect()
}

/// Runs `splicer convert-nginx FILE`: the TOML on stdout, each untranslated
/// directive on stderr too. Fails on text that is not nginx config syntax,
/// or a config with nothing to listen on; a config that converts may still
/// be one nginx itself would refuse.
pub fn run(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    // nginx takes any bytes; the parser takes text.
    let text = String::from_utf8_lossy(&bytes);
    let mut conversion = nginx::convert(&text).with_context(|| format!("{}", path.display()))?;
    if let Err(e) = std::str::from_utf8(&bytes) {
        let line = 1 + bytes[..e.valid_up_to()].iter().filter(|b| **b == b'\n').count();
        conversion.skipped.insert(
            0,
            Skipped {
                line,
                text: "bytes that are not UTF-8".into(),
                why: "each was read as U+FFFD: check any value that held one".into(),
            },
        );
    }
    for s in &conversion.skipped {
        eprintln!(
            "splicer: {}: not translated: {}",
            path.display(),
            printable(&s.to_string())
        );
    }
    if conversion.listeners.is_empty() {
        bail!(
            "{}: no stream or http server with a listen and a proxy_pass to convert",
            path.display()
        );
    }
    print!("{}", conversion.to_toml(&path.display().to_string())?);
    Ok(())
}
