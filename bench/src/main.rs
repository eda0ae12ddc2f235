//! splicer-bench: the load generator behind `cargo xtask bench`.
//!
//! `server` is the far end every forwarder forwards to; each client
//! subcommand runs one workload against a target address, checks that every
//! byte and message arrived, and prints one JSON line with what it measured.
//! xtask runs these as separate processes so that its own CPU time and the
//! load generator's never mix with the forwarder's.
mod client;
mod mqtt;
mod net;
mod server;
mod tls;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(about = "load generator for `cargo xtask bench`")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept connections (PROXY header optional), then serve the command
    /// byte that follows: `D` discard and report the count, `E` echo.
    Server {
        #[arg(long)]
        listen: SocketAddr,
        /// Also accept TLS here (PROXY header optional, before the
        /// handshake), with this certificate and key, for the same commands.
        #[arg(long, requires_all = ["tls_cert", "tls_key"])]
        tls_listen: Option<SocketAddr>,
        #[arg(long, value_name = "PEM")]
        tls_cert: Option<PathBuf>,
        #[arg(long, value_name = "PEM")]
        tls_key: Option<PathBuf>,
    },
    /// Send BYTES in total over CONNS parallel connections; the server
    /// reports what it received, which must match.
    Bulk {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        conns: usize,
        #[arg(long, value_parser = humantime_secs)]
        max_time: Duration,
    },
    /// ROUNDS request/response exchanges of SIZE bytes on one connection.
    Pingpong {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        rounds: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, value_parser = humantime_secs)]
        max_time: Duration,
    },
    /// CONNS short connections (connect, 8 bytes each way, close), with
    /// CONCURRENCY of them in flight; with --mqtt, MQTT sessions instead
    /// (connect, CONNECT, CONNACK, DISCONNECT, close): a reconnect storm.
    Connrate {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        conns: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, value_parser = humantime_secs)]
        max_time: Duration,
        #[arg(long)]
        mqtt: bool,
    },
    /// CONNS MQTT clients connect and say `ready`; after a line on stdin
    /// they publish RATE messages per second in total, in turn, for
    /// DURATION, to one subscriber.
    Fleet {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        conns: usize,
        #[arg(long)]
        rate: f64,
        #[arg(long, value_parser = humantime_secs)]
        duration: Duration,
        #[arg(long, default_value_t = 64)]
        payload: usize,
    },
    /// CONNS TLS connections, CONCURRENCY at a time, each a full handshake
    /// (no resumption), 8 bytes echoed, close.
    TlsHandshakes {
        #[command(flatten)]
        tls: TlsTarget,
        #[arg(long)]
        conns: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, value_parser = humantime_secs)]
        max_time: Duration,
    },
    /// Send BYTES through one TLS connection; the server reports what it
    /// received, which must match.
    TlsBulk {
        #[command(flatten)]
        tls: TlsTarget,
        #[arg(long)]
        bytes: u64,
        #[arg(long, value_parser = humantime_secs)]
        max_time: Duration,
    },
    /// Open CONNS connections, check each end to end, print `ready`, hold
    /// them until a line (or EOF) on stdin, then close them.
    Idle {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        conns: usize,
    },
    /// PUBLISHERS MQTT clients publish MESSAGES in total at QOS to one
    /// subscriber; all connect to TARGET.
    Mqtt {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        publishers: usize,
        #[arg(long)]
        messages: u64,
        #[arg(long)]
        qos: u8,
        #[arg(long, default_value_t = 64)]
        payload: usize,
        /// Messages published but not yet received, at most: without a
        /// bound, QoS 0 latency would only measure how deep queues get.
        #[arg(long, default_value_t = 500)]
        window: u64,
        /// Messages per second from all publishers together (0: as fast as
        /// the window allows).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[arg(long, value_parser = humantime_secs)]
        max_time: Duration,
    },
}

/// Where a TLS client connects and what it trusts.
#[derive(Args)]
struct TlsTarget {
    #[arg(long)]
    target: SocketAddr,
    /// The only CA the client trusts.
    #[arg(long, value_name = "PEM")]
    ca: PathBuf,
    /// Sent as SNI and checked against the certificate.
    #[arg(long, default_value = "bench.example")]
    server_name: String,
}

impl TlsTarget {
    fn client(&self) -> Result<tls::Client> {
        tls::Client::new(&self.ca, &self.server_name)
    }
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    s.trim_end_matches('s')
        .parse::<f64>()
        .map(Duration::from_secs_f64)
        .map_err(|e| format!("{s}: {e} (want seconds, e.g. 30s)"))
}

fn main() -> Result<()> {
    let result = match Cli::parse().cmd {
        Cmd::Server {
            listen,
            tls_listen,
            tls_cert,
            tls_key,
        } => {
            let tls = match (tls_listen, tls_cert, tls_key) {
                (Some(addr), Some(cert), Some(key)) => Some(server::TlsListen {
                    addr,
                    config: tls::server_config(&cert, &key)?,
                }),
                _ => None,
            };
            return server::run(listen, tls);
        }
        Cmd::Bulk {
            target,
            bytes,
            conns,
            max_time,
        } => client::bulk(target, bytes, conns, max_time)?,
        Cmd::Pingpong {
            target,
            rounds,
            size,
            max_time,
        } => client::pingpong(target, rounds, size, max_time)?,
        Cmd::Connrate {
            target,
            conns,
            concurrency,
            max_time,
            mqtt,
        } => {
            let exchange = if mqtt { mqtt::reconnect } else { client::short_exchange };
            client::connrate(target, conns, concurrency, max_time, exchange)?
        }
        Cmd::Fleet {
            target,
            conns,
            rate,
            duration,
            payload,
        } => mqtt::fleet(&mqtt::Fleet {
            target,
            conns,
            rate,
            duration,
            payload,
        })?,
        Cmd::TlsHandshakes {
            tls,
            conns,
            concurrency,
            max_time,
        } => tls::handshakes(tls.client()?, tls.target, conns, concurrency, max_time)?,
        Cmd::TlsBulk {
            tls,
            bytes,
            max_time,
        } => tls::bulk(&tls.client()?, tls.target, bytes, max_time)?,
        Cmd::Idle { target, conns } => client::idle(target, conns)?,
        Cmd::Mqtt {
            target,
            publishers,
            messages,
            qos,
            payload,
            window,
            rate,
            max_time,
        } => mqtt::run(&mqtt::Plan {
            target,
            publishers,
            messages,
            qos,
            payload,
            window,
            rate,
            max_time,
        })?,
    };
    println!("{result}");
    Ok(())
}
