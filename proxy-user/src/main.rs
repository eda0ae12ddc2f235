//! splicer: accepts MQTT clients, connects each to an upstream broker, tells
//! the broker who the client is (PROXY protocol, X-Forwarded-For), and lets
//! an eBPF sockmap program carry the bytes from then on.
//!
//! Layers, each calling only those below it (docs/architecture.md):
//! app → conn → ingress / upstream / datapath → config, metrics, drain, net
//! (and the splicer-proto and proxy-common crates).
mod app;
mod cli;
mod config;
mod conn;
mod convert;
mod datapath;
mod drain;
mod ingress;
mod metrics;
mod net;
mod tls;
mod upstream;

use anyhow::Result;
use clap::Parser;

fn main() -> Result<()> {
    let cli = cli::Cli::parse();
    if let Some(dir) = &cli.write_docs {
        return cli::write_docs(dir);
    }
    if let Some(cli::Command::ConvertNginx { file }) = &cli.command {
        return convert::run(file).inspect_err(|e| {
            eprintln!("splicer: {e:#}");
            std::process::exit(2);
        });
    }
    let check = cli.check;
    let reload = cli.reload_source();
    let config = match cli.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("splicer: {e:#}");
            std::process::exit(2);
        }
    };
    if check {
        println!("configuration ok: {config:#?}");
        return Ok(());
    }
    app::logging::init(config.log_level, config.log_format);
    app::one_heap();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(app::run(config, reload))
}
