//! Binding a listener and accepting clients, with `max-conns`.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Result;
use socket2::{Domain, Socket, Type};
use tokio::{net::TcpListener, sync::watch};

use crate::{
    conn::{self, ListenerCtx},
    metrics::{CloseReason, Reject},
};

/// Accept backlog: a broker restart makes every client reconnect at once.
const BACKLOG: i32 = 4096;

pub fn bind(name: &str, addr: SocketAddr) -> Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into()).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::PermissionDenied if addr.port() < 1024 => {
                " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
            }
            _ => "",
        };
        anyhow::anyhow!("listener `{name}`: cannot bind {addr}: {e}{hint}")
    })?;
    socket.listen(BACKLOG)?;
    Ok(TcpListener::from_std(socket.into())?)
}

/// Accepts until the task is aborted. Each client is served with the
/// listener's settings current at its accept (a reload swaps them in `ctx`).
pub async fn serve(ctx: watch::Receiver<Arc<ListenerCtx>>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                let ctx = ctx.borrow().clone();
                // Counted here, not in the task, so max-conns is exact.
                ctx.metrics.accepted();
                let max = ctx.config.max_conns.unwrap_or(u64::MAX);
                if ctx.metrics.active.get() as u64 > max {
                    ctx.metrics.rejected(Reject::max_conns);
                    ctx.metrics.closed(CloseReason::rejected);
                    log::warn!(
                        "[{}] {peer}: refused, the listener has max-conns = {max} clients",
                        ctx.config.name
                    );
                    continue;
                }
                // Held until the handshake is over (conn::serve drops it).
                let Ok(handshake) = ctx.handshakes.clone().try_acquire_owned() else {
                    ctx.metrics.rejected(Reject::max_handshakes);
                    ctx.metrics.closed(CloseReason::rejected);
                    log::warn!(
                        "[{}] {peer}: refused, the listener has max-handshakes = {} clients in their handshake",
                        ctx.config.name,
                        ctx.config.max_handshakes
                    );
                    continue;
                };
                tokio::spawn(conn::handle(ctx, client, peer, handshake));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::error!("[{}] accept failed: {e}", ctx.borrow().config.name);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
