//! What splicer reads from a client before it hands the connection to the
//! kernel, as pure functions: bytes in, a parsed value or a refusal out. No
//! sockets, no clocks, no logging, so the fuzz targets and the unit tests
//! see exactly the code the proxy runs.
//!
//! - [`proxy_protocol`]: HAProxy PROXY headers, v1 and v2, parsed and built.
//! - [`http_upgrade`]: the WebSocket upgrade request, checked and rewritten
//!   with X-Forwarded-For / X-Forwarded-Port / a real-IP header.
//! - [`mqtt`]: the MQTT CONNECT a client sends first (3.1, 3.1.1, 5.0),
//!   checked and read for who connects.
//! - [`tls_hello`]: the TLS ClientHello, read for its server name (SNI)
//!   and ALPN without terminating TLS, on `tls-passthrough` listeners.
//! - [`ws_frame`]: WebSocket client frames, read for the MQTT CONNECT
//!   inside them on `mqtt-ws` listeners.
//! - [`preamble`]: readers that take these as they arrive, a segment at a
//!   time, with work proportional to the bytes.
//! - [`trust`] and [`real_ip`]: which peers are believed (nginx
//!   `set_real_ip_from`), and the real client found right to left in an
//!   X-Forwarded-For list (nginx `real_ip_recursive`).
pub mod http_upgrade;
pub mod mqtt;
pub mod preamble;
pub mod proxy_protocol;
pub mod real_ip;
pub mod tls_hello;
pub mod trust;
pub mod ws_frame;
