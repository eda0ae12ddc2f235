//! Who the client is, decided from the first bytes it sends: a PROXY
//! header from a trusted hop (proxy_header.rs), a WebSocket upgrade with
//! forwarding headers and the broker's answer to it (websocket.rs), an
//! MQTT CONNECT (mqtt.rs), a TLS ClientHello (tls.rs), all read through
//! one Inbox per socket (inbox.rs); and whether that client may come in
//! (access.rs) now (limit.rs).
pub mod access;
pub mod client;
pub mod inbox;
pub mod limit;
pub mod mqtt;
pub mod proxy_header;
pub mod tls;
pub mod websocket;
