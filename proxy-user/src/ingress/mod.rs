//! Who the client is, decided from the first bytes it sends: a PROXY
//! header from a trusted hop (proxy_header.rs), a WebSocket upgrade with
//! forwarding headers (websocket.rs), both read without consuming a byte
//! more than they are (peek.rs); and whether that client may come in
//! (access.rs).
pub mod access;
mod peek;
pub mod proxy_header;
pub mod websocket;
