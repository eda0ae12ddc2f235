//! Command-line flags. `--config FILE` runs several listeners from TOML;
//! without it, `--listen` and `--upstream` describe one listener.
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Parser;

use std::net::SocketAddr;

use crate::config::{
    Config, Dur, Handoff, ListenerSpec, LogFormat, LogLevel, OffloadMode, Overrides, DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_RESOLVE_INTERVAL, DEFAULT_RESOLV_CONF,
};

#[derive(Debug, Parser)]
#[command(
    name = "splicer",
    version,
    about = "eBPF-assisted forwarding proxy for MQTT brokers",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML config file with one or more [[listener]] tables.
    #[arg(long, value_name = "FILE")] pub config: Option<PathBuf>,
    /// One listener from flags (without --config).
    #[command(flatten)]
    pub listener: ListenerSpec,
    /// Who forwards bulk bytes: the eBPF sockmap, userspace, or auto.
    #[arg(long, value_enum, value_name = "auto|sockmap|userspace")] pub offload: Option<OffloadMode>,
    /// When the kernel takes a connection over: now, or auto (relay in userspace until it goes idle or carries a bulk stream) [default: auto].
    #[arg(long, value_enum, value_name = "now|auto")] pub handoff: Option<Handoff>,
    /// off, error, warn, info, debug or trace [default: info].
    #[arg(long, value_name = "LEVEL")] pub log_level: Option<LogLevel>,
    /// text, or json (one object per line, for Loki or Elasticsearch) [default: text].
    #[arg(long, value_enum, value_name = "text|json")] pub log_format: Option<LogFormat>,
    /// Where upstream names are resolved [default: /etc/resolv.conf].
    #[arg(long, value_name = "FILE")] pub resolv_conf: Option<PathBuf>,
    /// How often upstream names are resolved again; a shorter TTL wins [default: 10s].
    #[arg(long, value_name = "DURATION")] pub resolve_interval: Option<Dur>,
    /// Serve Prometheus metrics on this address at /metrics.
    #[arg(long, value_name = "ADDR")] pub metrics: Option<SocketAddr>,
    /// On SIGTERM, how long live connections may take to finish [default: 30s].
    #[arg(long, value_name = "DURATION")] pub drain_timeout: Option<Dur>,
    /// Cap on what spliced connections may hold in kernel queues beyond each direction's floor, e.g. 512MiB [default: half of net.ipv4.tcp_mem's pressure threshold].
    #[arg(long, value_name = "SIZE")] pub max_buffered: Option<bytesize::ByteSize>,
    /// Check the configuration, print it, and exit.
    #[arg(long)] pub check: bool,
    /// Write the man page (splicer.1) and shell completions (bash, zsh,
    /// fish) into DIR, and exit (`cargo xtask dist` packages them).
    #[arg(long, value_name = "DIR", hide = true)] pub write_docs: Option<PathBuf>,
}

/// Tools that run instead of the proxy.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print the splicer.toml equivalent of an nginx config (stream and
    /// http servers, upstreams, PROXY protocol, real IP, X-Forwarded-*);
    /// every directive not translated is named, with its line, on stderr
    /// and in the output.
    ConvertNginx {
        /// The nginx config, e.g. /etc/nginx/nginx.conf.
        file: PathBuf,
    },
}

/// Where SIGHUP re-reads the configuration from.
pub struct ReloadSource {
    pub path: PathBuf,
    overrides: Overrides,
}

impl ReloadSource {
    pub fn load(&self) -> Result<Config> {
        Config::from_file(&self.path, &self.overrides)
    }
}

/// The man page and completions, from these very flags.
pub fn write_docs(dir: &std::path::Path) -> Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    let cmd = Cli::command();
    let mut man = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut man)?;
    std::fs::write(dir.join("splicer.1"), man)?;
    for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "splicer", dir)?;
    }
    Ok(())
}

impl Cli {
    fn overrides(&self) -> Overrides {
        Overrides {
            log_level: self.log_level.map(|l| l.0),
            log_format: self.log_format,
            resolv_conf: self.resolv_conf.clone(),
            resolve_interval: self.resolve_interval.map(|d| d.0),
            offload: self.offload,
            handoff: self.handoff,
            metrics: self.metrics,
            drain_timeout: self.drain_timeout.map(|d| d.0),
            max_buffered: self.max_buffered.map(|b| b.as_u64()),
        }
    }

    /// The config file, when there is one (flags leave nothing to re-read).
    pub fn reload_source(&self) -> Option<ReloadSource> {
        self.config.clone().map(|path| ReloadSource {
            path,
            overrides: self.overrides(),
        })
    }

    pub fn into_config(self) -> Result<Config> {
        let overrides = self.overrides();
        if let Some(path) = &self.config {
            if self.listener != ListenerSpec::default() {
                bail!("--config cannot be combined with listener flags (--listen, --upstream, --send-proxy, ...): put them in the file");
            }
            return Config::from_file(path, &overrides);
        }
        if self.listener.listen.is_none() {
            bail!("nothing to do: give --config FILE, or --listen ADDR with --upstream ADDR");
        }
        let listener = ListenerSpec {
            name: Some("default".into()),
            ..self.listener
        }
        .resolve(0)?;
        let config = Config {
            log_level: overrides.log_level.unwrap_or(log::LevelFilter::Info),
            log_format: overrides.log_format.unwrap_or_default(),
            resolv_conf: overrides.resolv_conf.clone().unwrap_or_else(|| DEFAULT_RESOLV_CONF.into()),
            resolve_interval: overrides.resolve_interval.unwrap_or(DEFAULT_RESOLVE_INTERVAL),
            offload: overrides.offload.unwrap_or(OffloadMode::Auto),
            handoff: overrides.handoff.unwrap_or_default(),
            metrics: overrides.metrics,
            drain_timeout: overrides.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT),
            max_buffered: overrides.max_buffered,
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
    use crate::config::{AcceptProxy, SendProxy, UntrustedProxy};
    use ipnet::IpNet;

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
            "--max-buffered",
            "1GiB",
        ])
        .unwrap();
        let l = &c.listeners[0];
        assert_eq!(l.upstreams.len(), 2);
        assert_eq!(l.send_proxy, SendProxy::V1);
        assert_eq!(l.connect_timeout, std::time::Duration::from_secs(2));
        assert_eq!(c.offload, OffloadMode::Userspace);
        assert_eq!(c.log_level, log::LevelFilter::Warn);
        assert_eq!(c.max_buffered, Some(1 << 30));
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
        const L: [&str; 4] = ["--listen", "127.0.0.1:1883", "--upstream", "127.0.0.1:1"];
        // Each command line, and the words its error must contain.
        let cases: [(Vec<&str>, &str); 6] = [
            ([&L[..], &["--send-proxy", "v9"]].concat(), "--send-proxy"),
            (vec!["--listen", "nope", "--upstream", "127.0.0.1:1"], "--listen"),
            (L[..2].to_vec(), "`upstream`"),
            ([&L[..], &["--connect-timeout", "x"]].concat(), "--connect-timeout"),
            (vec!["--config", "x.toml", "--listen", "127.0.0.1:1883"], "cannot be combined"),
            (vec![], "nothing to do"),
        ];
        for (args, word) in cases {
            let e = config(&args).unwrap_err();
            assert!(format!("{e:#}").contains(word), "{args:?}: {e:#}");
        }
    }
}
