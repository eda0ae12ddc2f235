//! The brokers behind a listener: which one a new client goes to
//! (balance.rs; by TLS server name first on passthrough listeners,
//! sni.rs) and whether each is fit to take it (health.rs).
pub mod balance;
pub mod health;
pub mod sni;
