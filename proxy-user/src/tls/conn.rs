//! A terminated TLS connection: rustls's sans-IO `ServerConnection` driven
//! over the client's own TcpStream. No wrapper stream and no buffer of
//! ours: ciphertext goes between the socket and rustls as it is read and
//! written, and plaintext between rustls and the caller's buffer. The
//! session sits behind a Mutex (never held across an await) so both relay
//! directions and the handshake readers can share `&TlsConn`, as they
//! share `&TcpStream` on plain connections.
use std::{
    fmt, io,
    io::{Read as _, Write as _},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use rustls::{ServerConfig, ServerConnection};
use tokio::net::TcpStream;

use crate::net;

pub struct TlsConn {
    tcp: TcpStream,
    session: Mutex<ServerConnection>,
}

/// Why a handshake did not complete.
#[derive(Debug)]
pub enum HandshakeFailure {
    /// rustls refused the client (an alert was sent, where one could be).
    Tls(rustls::Error),
    Timeout,
    /// The client closed, or the socket failed, before the end.
    Closed,
}

impl HandshakeFailure {
    /// The `reason` label of `splicer_tls_handshake_failures_total`.
    pub fn label(&self) -> &'static str {
        use rustls::Error as E;
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Closed => "closed",
            HandshakeFailure::Tls(e) => match e {
                E::NoCertificatesPresented => "no_client_cert",
                E::InvalidCertificate(_) => "bad_client_cert",
                E::PeerIncompatible(_) => "incompatible",
                E::NoApplicationProtocol => "no_alpn",
                E::AlertReceived(_) => "client_alert",
                _ => "malformed",
            },
        }
    }
}

/// Every label `HandshakeFailure::label` gives, for the metric's series.
pub const HANDSHAKE_FAILURE_LABELS: [&str; 8] = [
    "timeout",
    "closed",
    "no_client_cert",
    "bad_client_cert",
    "incompatible",
    "no_alpn",
    "client_alert",
    "malformed",
];

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeFailure::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            HandshakeFailure::Timeout => f.write_str("no TLS handshake within tls-handshake-timeout"),
            HandshakeFailure::Closed => f.write_str("closed during the TLS handshake"),
        }
    }
}

impl TlsConn {
    /// Completes the server side of a handshake on `tcp`, whose first
    /// bytes (read behind a PROXY header) are `early`.
    pub async fn accept(
        tcp: TcpStream,
        config: Arc<ServerConfig>,
        early: &[u8],
        limit: Duration,
    ) -> Result<TlsConn, HandshakeFailure> {
        let session = ServerConnection::new(config).map_err(HandshakeFailure::Tls)?;
        let conn = TlsConn {
            tcp,
            session: Mutex::new(session),
        };
        match tokio::time::timeout(limit, conn.handshake(early)).await {
            Ok(Ok(())) => Ok(conn),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(HandshakeFailure::Timeout),
        }
    }

    async fn handshake(&self, mut early: &[u8]) -> Result<(), HandshakeFailure> {
        while !early.is_empty() {
            let fed = self.lock().read_tls(&mut early);
            if fed.is_err() {
                return Err(HandshakeFailure::Closed);
            }
            self.process().await?;
        }
        loop {
            self.flush().await.map_err(|_| HandshakeFailure::Closed)?;
            if !self.lock().is_handshaking() {
                return Ok(());
            }
            match self.read_more().await {
                Ok(true) => {}
                Ok(false) | Err(Failed::Io(_)) => return Err(HandshakeFailure::Closed),
                Err(Failed::Tls(e)) => return Err(HandshakeFailure::Tls(e)),
            }
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The session, for what the handshake settled (and the relay).
    pub fn lock(&self) -> MutexGuard<'_, ServerConnection> {
        self.session.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Plaintext into `buf` (appended): Ok(n > 0), or Ok(0) at the end of
    /// the client's stream (its close_notify, or a FIN: MQTT clients often
    /// just close). Waits for the client as needed.
    pub async fn read_plain(&self, buf: &mut Vec<u8>, chunk: usize) -> io::Result<usize> {
        loop {
            let read = {
                let mut s = self.lock();
                let start = buf.len();
                buf.resize(start + chunk, 0);
                let r = s.reader().read(&mut buf[start..]);
                buf.truncate(start + *r.as_ref().unwrap_or(&0));
                r
            };
            match read {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            match self.read_more().await {
                Ok(_) => {}
                Err(Failed::Io(e)) => return Err(e),
                Err(Failed::Tls(e)) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        }
    }

    /// Encrypts all of `data` and sends it.
    pub async fn write_plain(&self, data: &[u8]) -> io::Result<()> {
        {
            let mut s = self.lock();
            // Bounded by `data`: flush below sends it before more is taken.
            s.set_buffer_limit(None);
            s.writer().write_all(data)?;
        }
        self.flush().await
    }

    /// Sends close_notify and a FIN: the client's stream ends here.
    pub async fn close_write(&self) -> io::Result<()> {
        self.lock().send_close_notify();
        self.flush().await?;
        net::half_close(&self.tcp)
    }

    /// Writes out whatever the session has to send (records, alerts,
    /// tickets), waiting for room as needed.
    pub async fn flush(&self) -> io::Result<()> {
        loop {
            let wrote = {
                let mut s = self.lock();
                if !s.wants_write() {
                    return Ok(());
                }
                s.write_tls(&mut Socket(&self.tcp))
            };
            match wrote {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.tcp.writable().await?,
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads what ciphertext has arrived (waiting for some) and processes
    /// it, sending whatever that asks for (an alert, a handshake answer).
    /// Ok(false): the client's end of the stream.
    pub async fn read_more(&self) -> Result<bool, Failed> {
        loop {
            self.tcp.readable().await.map_err(Failed::Io)?;
            let read = self.lock().read_tls(&mut Socket(&self.tcp));
            match read {
                Ok(0) => {
                    self.process().await.map_err(|e| match e {
                        HandshakeFailure::Tls(e) => Failed::Tls(e),
                        _ => Failed::Io(io::ErrorKind::UnexpectedEof.into()),
                    })?;
                    return Ok(false);
                }
                Ok(_) => {
                    self.process().await.map_err(|e| match e {
                        HandshakeFailure::Tls(e) => Failed::Tls(e),
                        _ => Failed::Io(io::ErrorKind::BrokenPipe.into()),
                    })?;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Failed::Io(e)),
            }
        }
    }

    /// Processes received records; on an error, sends the alert rustls
    /// queued for it before saying so.
    async fn process(&self) -> Result<(), HandshakeFailure> {
        let processed = self.lock().process_new_packets();
        let flushed = self.flush().await;
        match (processed, flushed) {
            (Err(e), _) => Err(HandshakeFailure::Tls(e)),
            (Ok(_), Err(_)) => Err(HandshakeFailure::Closed),
            (Ok(_), Ok(())) => Ok(()),
        }
    }
}

/// Why reading from the client failed.
#[derive(Debug)]
pub enum Failed {
    Io(io::Error),
    Tls(rustls::Error),
}

/// The socket as rustls reads and writes it: one non-blocking call each.
struct Socket<'a>(&'a TcpStream);

impl io::Read for Socket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl io::Write for Socket<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
