//! A connection as the datapath carries it, in types: what it is handed
//! (`Carried`, `Early`), how each direction ends (`End`), how the
//! connection ends (`Outcome`, the close line's `end=`), and the `Owner`
//! that end is reported to. The connection layer implements `Owner`; the
//! datapath never calls up into it by name.
use std::{
    fmt,
    future::Future,
    net::SocketAddr,
    os::fd::AsFd,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::TcpStream;

use crate::{drain::Drain, metrics::ListenerMetrics, net};

/// A connection ready to be carried: both sockets connected, the upstream
/// told who the client is. The client is its socket, or the TLS session
/// over it that the listener terminates.
pub struct Carried<C = TcpStream> {
    pub client: C,
    pub upstream: TcpStream,
    pub who: ClientAddrs,
    /// When the client was accepted, for the close line's duration.
    pub started: Instant,
    pub owner: Arc<dyn Owner>,
}

/// What userspace has read of each side before the handoff.
pub struct Early {
    /// Client bytes read and not forwarded as they came (its PROXY header,
    /// its upgrade request: the upstream got its own version of them).
    pub consumed: u64,
    /// Client bytes read behind those, to forward first (early frames).
    pub client: Vec<u8>,
    /// Upstream bytes read (the broker's `101` and anything behind it), to
    /// forward to the client first.
    pub upstream: Vec<u8>,
    /// Upstream bytes the connection layer already forwarded to the client
    /// (the broker's `101` on an `mqtt-ws` listener, sent so the client
    /// would send its CONNECT).
    pub sent_to_client: u64,
}

/// What userspace took of each side before the handoff: counted so the
/// kernel's FIN checks know where its own bytes begin.
#[derive(Debug, Clone, Copy)]
pub struct Read {
    /// Client bytes read and not forwarded (PROXY header, upgrade request).
    pub consumed: u64,
    /// Client bytes forwarded upstream by userspace.
    pub c2u: u64,
    /// Upstream bytes forwarded to the client by userspace.
    pub u2c: u64,
}

/// How one direction of a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// `src` sent FIN and it was passed on to `dst` after every byte.
    Fin,
    /// `src` was reset (RST) or failed.
    SrcReset,
    /// `dst` could not take more bytes (reset, or gone).
    DstFailed,
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both sides closed; the client first.
    ClientClosed,
    /// Both sides closed; the upstream first.
    UpstreamClosed,
    ClientReset,
    UpstreamReset,
    /// Closed by splicer at the end of a SIGTERM drain.
    Drained,
    /// A local failure (the sockets could not be handed on, or read).
    Error,
}

impl Outcome {
    /// How it ended, once it has: a reset anywhere ends both directions;
    /// otherwise both must have ended, and `first` is who closed first.
    pub fn of(c2u: Option<End>, u2c: Option<End>, first: Outcome) -> Option<Outcome> {
        match (c2u, u2c) {
            (Some(End::SrcReset), _) | (_, Some(End::DstFailed)) => Some(Outcome::ClientReset),
            (Some(End::DstFailed), _) | (_, Some(End::SrcReset)) => Some(Outcome::UpstreamReset),
            (Some(_), Some(_)) => Some(first),
            _ => None,
        }
    }

    /// Passes the end on to both sockets before they close: a reset
    /// becomes RST on both, a drain a FIN on both (whatever they were
    /// doing), a normal close stays a FIN.
    pub fn pass_on(self, client: &impl AsFd, upstream: &impl AsFd) {
        match self {
            Outcome::ClientReset | Outcome::UpstreamReset => {
                net::abort_on_close(client);
                net::abort_on_close(upstream);
            }
            Outcome::Drained => {
                let _ = net::half_close(client);
                let _ = net::half_close(upstream);
            }
            _ => {}
        }
    }
}

impl fmt::Display for Outcome {
    /// The close line's words, which logs and tests read.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::ClientClosed => "client closed",
            Outcome::UpstreamClosed => "upstream closed",
            Outcome::ClientReset => "client reset",
            Outcome::UpstreamReset => "upstream reset",
            Outcome::Drained => "drained",
            Outcome::Error => "error",
        })
    }
}

/// What a connection carried, for its close line.
#[derive(Debug, Clone, Copy)]
pub struct Totals {
    pub c2u: u64,
    pub u2c: u64,
    /// Of those, bytes the kernel redirected (never seen by userspace).
    pub kernel: u64,
    pub outcome: Outcome,
}

impl Totals {
    pub fn error() -> Totals {
        Totals {
            c2u: 0,
            u2c: 0,
            kernel: 0,
            outcome: Outcome::Error,
        }
    }
}

/// Who is on the client side of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddrs {
    /// The TCP peer splicer accepted.
    pub peer: SocketAddr,
    /// The real client: the peer, or who a trusted PROXY header or
    /// X-Forwarded-For named.
    pub real: SocketAddr,
}

/// The connection layer's side of a carried connection: its listener's
/// counters, and where its end is reported. One per listener and upstream,
/// shared by their connections, so a parked connection holds one pointer.
pub trait Owner: Send + Sync {
    fn metrics(&self) -> &ListenerMetrics;
    /// The connection is over and both sockets are closed.
    fn closed(&self, who: ClientAddrs, totals: &Totals, duration: Duration);
}

/// Runs both directions of a connection that has a task. A FIN in one
/// direction leaves the other running (half-close); a reset anywhere ends
/// both. `*_reset` resolve if that side is reset after its FIN was passed
/// on. A drain that runs out of time ends both.
pub async fn drive(
    drain: &Drain,
    c2u: impl Future<Output = End>,
    u2c: impl Future<Output = End>,
    client_reset: impl Future<Output = End>,
    upstream_reset: impl Future<Output = End>,
) -> Outcome {
    let drained = drain.forced();
    tokio::pin!(c2u, u2c, client_reset, upstream_reset, drained);
    let (mut c2u_end, mut u2c_end) = (None, None);
    let mut first_fin = None;
    loop {
        tokio::select! {
            e = &mut c2u, if c2u_end.is_none() => {
                c2u_end = Some(e);
                first_fin.get_or_insert(Outcome::ClientClosed);
            }
            e = &mut u2c, if u2c_end.is_none() => {
                u2c_end = Some(e);
                first_fin.get_or_insert(Outcome::UpstreamClosed);
            }
            e = &mut client_reset, if c2u_end == Some(End::Fin) && u2c_end.is_none() => c2u_end = Some(e),
            e = &mut upstream_reset, if u2c_end == Some(End::Fin) && c2u_end.is_none() => u2c_end = Some(e),
            () = &mut drained => return Outcome::Drained,
        }
        // `first_fin` is set as soon as either direction ended.
        if let Some(outcome) = Outcome::of(c2u_end, u2c_end, first_fin.unwrap_or(Outcome::ClientClosed)) {
            return outcome;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_anywhere_ends_the_connection_and_names_the_side() {
        use End::*;
        let first = Outcome::UpstreamClosed;
        assert_eq!(Outcome::of(Some(SrcReset), None, first), Some(Outcome::ClientReset));
        assert_eq!(Outcome::of(None, Some(DstFailed), first), Some(Outcome::ClientReset));
        assert_eq!(Outcome::of(Some(DstFailed), None, first), Some(Outcome::UpstreamReset));
        assert_eq!(Outcome::of(Some(Fin), Some(SrcReset), first), Some(Outcome::UpstreamReset));
        assert_eq!(Outcome::of(Some(Fin), None, first), None);
        assert_eq!(Outcome::of(Some(Fin), Some(Fin), first), Some(first));
    }

    #[test]
    fn the_close_line_words_stay_what_logs_and_tests_read() {
        let words: Vec<String> = [
            Outcome::ClientClosed,
            Outcome::UpstreamClosed,
            Outcome::ClientReset,
            Outcome::UpstreamReset,
            Outcome::Drained,
            Outcome::Error,
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(
            words,
            ["client closed", "upstream closed", "client reset", "upstream reset", "drained", "error"]
        );
    }
}
