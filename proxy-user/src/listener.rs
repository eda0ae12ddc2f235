//! Binding a listener and accepting clients.
use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;

use crate::conn::{self, ListenerCtx};

/// Accept backlog: a broker restart makes every client reconnect at once.
const BACKLOG: i32 = 4096;

pub fn bind(ctx: &ListenerCtx) -> Result<TcpListener> {
    let addr = ctx.config.listen;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("listener `{}`: cannot bind {addr}", ctx.config.name))?;
    socket.listen(BACKLOG)?;
    Ok(TcpListener::from_std(socket.into())?)
}

pub async fn serve(ctx: Arc<ListenerCtx>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                tokio::spawn(conn::handle(ctx.clone(), client, peer));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::error!("[{}] accept failed: {e}", ctx.config.name);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
