//! What the end-to-end tests (`tests/`) and the benchmark (`cargo xtask
//! bench`) both need, in one place: child processes with their output in a
//! log file, free ports and listeners, the clock tick, scraping splicer's
//! `/metrics`, MQTT packets, and a WebSocket client codec. Dev tooling, never published.
pub mod metrics;
pub mod mqtt;
pub mod net;
pub mod proc;
pub mod system;
pub mod ws;

pub use net::{free_port, is_listening};
pub use proc::{run_with_timeout, Proc};
