//! Command-line flags. `--config FILE` runs several listeners from TOML;
//! without it, `--listen` and `--upstream` describe one listener.
use std::{net::SocketAddr, path::PathBuf};

use anyhow::{bail, Result};
use clap::Parser;

use ipnet::IpNet;

use crate::config::{
    AcceptProxy, Config, Dur, ListenerSpec, LogLevel, OffloadMode, Overrides, SendProxy,
    UntrustedProxy,
};

#[derive(Debug, Parser)]
#[command(
    name = "splicer",
    version,
    about = "eBPF-assisted forwarding proxy for MQTT brokers"
)]
pub struct Cli {
    /// TOML config file with one or more [[listener]] tables.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to accept clients on (single-listener mode).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Upstream broker address; repeat for several (round-robin).
    #[arg(long, value_name = "ADDR")]
    pub upstream: Vec<SocketAddr>,
    /// PROXY protocol header to write upstream before any client byte.
    #[arg(long, value_enum, value_name = "off|v1|v2")]
    pub send_proxy: Option<SendProxy>,
    /// Who forwards bulk bytes: the eBPF sockmap, userspace, or auto.
    #[arg(long, value_enum, value_name = "auto|sockmap|userspace")]
    pub offload: Option<OffloadMode>,
    /// Give up on an upstream connect after this long and try the next [default: 5s].
    #[arg(long, value_name = "DURATION")]
    pub connect_timeout: Option<Dur>,
    /// Require a PROXY header first from every peer: off, v1, v2, or auto
    /// (either) [default: off].
    #[arg(long, value_enum, value_name = "off|v1|v2|auto")]
    pub accept_proxy: Option<AcceptProxy>,
    /// Peers whose PROXY headers are believed (repeatable; IPv4 or IPv6 CIDR).
    #[arg(long, value_name = "CIDR")]
    pub trusted_proxy: Vec<IpNet>,
    /// Send a trusted peer's PROXY header upstream unchanged.
    #[arg(long)]
    pub proxy_passthrough: bool,
    /// How long a peer may take to send its whole PROXY header [default: 3s].
    #[arg(long, value_name = "DURATION")]
    pub proxy_timeout: Option<Dur>,
    /// A PROXY header from an untrusted peer: ignore it (use the peer's
    /// address) or reject the connection [default: ignore].
    #[arg(long, value_enum, value_name = "ignore|reject")]
    pub untrusted_proxy: Option<UntrustedProxy>,
    /// off, error, warn, info, debug or trace [default: info].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<LogLevel>,
    /// Check the configuration, print it, and exit.
    #[arg(long)]
    pub check: bool,
}

impl Cli {
    pub fn into_config(self) -> Result<Config> {
        let overrides = Overrides {
            log_level: self.log_level.map(|l| l.0),
            offload: self.offload,
        };
        let spec = ListenerSpec {
            name: None,
            listen: self.listen,
            upstream: self.upstream,
            send_proxy: self.send_proxy,
            connect_timeout: self.connect_timeout,
            accept_proxy: self.accept_proxy,
            trusted_proxy: self.trusted_proxy,
            proxy_passthrough: self.proxy_passthrough,
            proxy_timeout: self.proxy_timeout,
            untrusted_proxy: self.untrusted_proxy,
        };
        if let Some(path) = &self.config {
            if spec.listen.is_some()
                || !spec.upstream.is_empty()
                || spec.send_proxy.is_some()
                || spec.connect_timeout.is_some()
                || spec.accept_proxy.is_some()
                || !spec.trusted_proxy.is_empty()
                || spec.proxy_passthrough
                || spec.proxy_timeout.is_some()
                || spec.untrusted_proxy.is_some()
            {
                bail!("--config cannot be combined with listener flags (--listen, --upstream, --send-proxy, ...): put them in the file");
            }
            return Config::from_file(path, &overrides);
        }
        if spec.listen.is_none() {
            bail!("nothing to do: give --config FILE, or --listen ADDR with --upstream ADDR");
        }
        let listener = ListenerSpec {
            name: Some("default".into()),
            ..spec
        }
        .resolve(0)?;
        let config = Config {
            log_level: overrides.log_level.unwrap_or(log::LevelFilter::Info),
            offload: overrides.offload.unwrap_or(OffloadMode::Auto),
            listeners: vec![listener],
        };
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid flags: {e:#}"))?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Result<Config> {
        Cli::try_parse_from(std::iter::once("splicer").chain(args.iter().copied()))?.into_config()
    }

    #[test]
    fn single_listener_from_flags() {
        let c = config(&[
            "--listen",
            "127.0.0.1:1883",
            "--upstream",
            "127.0.0.1:1",
            "--upstream",
            "[::1]:2",
            "--send-proxy",
            "v1",
            "--offload",
            "userspace",
            "--connect-timeout",
            "2s",
            "--log-level",
            "warn",
        ])
        .unwrap();
        let l = &c.listeners[0];
        assert_eq!(l.upstreams.len(), 2);
        assert_eq!(l.send_proxy, SendProxy::V1);
        assert_eq!(l.connect_timeout, std::time::Duration::from_secs(2));
        assert_eq!(c.offload, OffloadMode::Userspace);
        assert_eq!(c.log_level, log::LevelFilter::Warn);
    }

    #[test]
    fn multi_tier_flags() {
        let c = config(&[
            "--listen",
            "127.0.0.1:1883",
            "--upstream",
            "127.0.0.1:1",
            "--accept-proxy",
            "auto",
            "--trusted-proxy",
            "10.0.0.0/8",
            "--trusted-proxy",
            "::1/128",
            "--proxy-passthrough",
            "--proxy-timeout",
            "2s",
            "--untrusted-proxy",
            "reject",
        ])
        .unwrap();
        let l = &c.listeners[0];
        assert_eq!(l.accept_proxy, AcceptProxy::Auto);
        assert_eq!(
            l.trusted_proxies,
            vec![
                "10.0.0.0/8".parse::<IpNet>().unwrap(),
                "::1/128".parse().unwrap()
            ]
        );
        assert!(l.proxy_passthrough);
        assert_eq!(l.proxy_timeout, std::time::Duration::from_secs(2));
        assert_eq!(l.untrusted_proxy, UntrustedProxy::Reject);
        let e = config(&[
            "--listen",
            "127.0.0.1:1883",
            "--upstream",
            "127.0.0.1:1",
            "--trusted-proxy",
            "10.0.0.0/99",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("--trusted-proxy"), "{e}");
    }

    #[test]
    fn flag_errors_name_the_flag() {
        let e = config(&[
            "--listen",
            "127.0.0.1:1883",
            "--upstream",
            "127.0.0.1:1",
            "--send-proxy",
            "v9",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("--send-proxy"), "{e}");
        let e = config(&["--listen", "nope", "--upstream", "127.0.0.1:1"]).unwrap_err();
        assert!(e.to_string().contains("--listen"), "{e}");
        let e = config(&["--listen", "127.0.0.1:1883"]).unwrap_err();
        assert!(format!("{e:#}").contains("`upstream`"), "{e:#}");
        let e = config(&[
            "--listen",
            "127.0.0.1:1883",
            "--upstream",
            "127.0.0.1:1",
            "--connect-timeout",
            "x",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("--connect-timeout"), "{e}");
        let e = config(&["--config", "x.toml", "--listen", "127.0.0.1:1883"]).unwrap_err();
        assert!(e.to_string().contains("cannot be combined"), "{e}");
        let e = config(&[]).unwrap_err();
        assert!(e.to_string().contains("nothing to do"), "{e}");
    }
}
