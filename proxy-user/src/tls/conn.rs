//! A terminated TLS connection: rustls's sans-IO `ServerConnection` driven
//! over the client's own TcpStream. No wrapper stream and no buffer of
//! ours: ciphertext goes between the socket and rustls as it is read and
//! written, and plaintext between rustls and the caller's buffer. The
//! session sits behind a Mutex (never held across an await) so both relay
//! directions and the preamble readers can share `&TlsConn`, as they share
//! `&TcpStream` on plain connections.
//!
//! Reading never waits for the client to take bytes: what processing
//! queues (an alert, a key update answer) is sent if the socket takes it
//! now, and otherwise left to the writer (`unsent` wakes it). A client
//! that writes before it reads is never stuck behind records it has not
//! read yet.
use std::{
    fmt, io,
    io::BufRead as _,
    sync::{Mutex, MutexGuard},
};

use rustls::server::{Acceptor, ServerConnection};
use tokio::{net::TcpStream, sync::Notify};

use super::{certs::Terminate, Facts};
use crate::net;

pub struct TlsConn {
    tcp: TcpStream,
    session: Mutex<ServerConnection>,
    /// Signalled when records wait that the socket did not take.
    pub unsent: Notify,
}

/// Plaintext rustls may hold before reading stops: its own limit (it
/// refuses to read past 16 KiB held).
const PLAINTEXT_BATCH: usize = 16 * 1024;

/// Why reading from the client stopped.
#[derive(Debug)]
pub enum Failed {
    Io(io::Error),
    Tls(rustls::Error),
}

/// Why a handshake did not complete.
#[derive(Debug)]
pub enum HandshakeFailure {
    /// rustls refused the client (an alert was sent, where one could be).
    Tls(rustls::Error),
    /// What came was not something rustls could buffer (too large).
    Unreadable(io::Error),
    /// The certificate's CN is too long for a PROXY header, holds control
    /// characters, or is in an encoding that cannot be read as text: a
    /// broker that takes the CN as the username must not get another.
    BadCn(&'static str),
    Timeout,
    /// The client closed, or the socket failed, before the end.
    Closed,
}

impl From<Failed> for HandshakeFailure {
    fn from(f: Failed) -> Self {
        match f {
            Failed::Tls(e) => HandshakeFailure::Tls(e),
            Failed::Io(_) => HandshakeFailure::Closed,
        }
    }
}

impl HandshakeFailure {
    /// The `reason` label of `splicer_tls_handshake_failures_total`.
    pub fn label(&self) -> &'static str {
        use rustls::Error as E;
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Closed => "closed",
            HandshakeFailure::BadCn(_) => "bad_client_cert",
            HandshakeFailure::Unreadable(_) => "malformed",
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
            HandshakeFailure::Unreadable(e) => write!(f, "TLS handshake failed: {e}"),
            HandshakeFailure::BadCn(why) => write!(f, "TLS handshake refused: the client certificate's CN {why}"),
            HandshakeFailure::Timeout => f.write_str("no TLS handshake within tls-handshake-timeout"),
            HandshakeFailure::Closed => f.write_str("closed during the TLS handshake"),
        }
    }
}

impl TlsConn {
    /// Completes the server side of a handshake on `tcp`, whose first
    /// bytes (read behind a PROXY header) are `early`, within the
    /// listener's handshake timeout; and says what it settled.
    pub async fn accept(tcp: TcpStream, t: &Terminate, early: &[u8]) -> Result<(TlsConn, Facts), HandshakeFailure> {
        let handshake = async {
            let (session, served, rest) = hello(&tcp, t, early).await?;
            let conn = TlsConn {
                tcp,
                session: Mutex::new(session),
                unsent: Notify::new(),
            };
            conn.handshake(rest).await?;
            Ok::<_, HandshakeFailure>((conn, served))
        };
        let (conn, served) = match tokio::time::timeout(t.settings.handshake_timeout, handshake).await {
            Ok(done) => done?,
            Err(_) => return Err(HandshakeFailure::Timeout),
        };
        let facts = Facts::of(&conn.lock(), t, served).map_err(HandshakeFailure::BadCn)?;
        Ok((conn, facts))
    }

    async fn handshake(&self, mut early: &[u8]) -> Result<(), HandshakeFailure> {
        while !early.is_empty() {
            match self.lock().read_tls(&mut early) {
                Ok(0) => return Err(HandshakeFailure::Closed),
                Ok(_) => {}
                Err(e) => return Err(HandshakeFailure::Unreadable(e)),
            }
            let processed = self.lock().process_new_packets();
            // The alert for a refusal, or the first flight.
            let flushed = self.flush().await;
            processed.map_err(HandshakeFailure::Tls)?;
            flushed.map_err(|_| HandshakeFailure::Closed)?;
        }
        loop {
            if !self.lock().is_handshaking() {
                // What is left (session tickets; TLS 1.2's last flight) goes
                // now if the socket takes it, else with the first write: a
                // client that finished and left at once has finished, and
                // its end shows to whoever reads next.
                self.send_queued();
                return Ok(());
            }
            self.flush().await.map_err(|_| HandshakeFailure::Closed)?;
            let more = self.read_more().await;
            // An alert for what was refused goes out before the close.
            let _ = self.flush().await;
            // A client may finish and close at once (its Finished, then
            // FIN): the end of its stream shows later, to the reader.
            if !more? && self.lock().is_handshaking() {
                return Err(HandshakeFailure::Closed);
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

    /// Plaintext into `buf` (appended, at most `chunk` bytes): Ok(n > 0),
    /// or Ok(0) at the end of the client's stream (its close_notify, or a
    /// FIN: MQTT clients often just close). Waits for the client as needed.
    pub async fn read_plain(&self, buf: &mut Vec<u8>, chunk: usize) -> io::Result<usize> {
        loop {
            // Copied straight from rustls's buffer: nothing zero-filled.
            let read = {
                let mut s = self.lock();
                let mut reader = s.reader();
                let taken = reader.fill_buf().map(|plain| {
                    let n = plain.len().min(chunk);
                    buf.extend_from_slice(&plain[..n]);
                    n
                });
                if let Ok(n) = taken {
                    reader.consume(n);
                }
                taken
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

    /// Encrypts all of `data` and sends it, waiting for room as needed.
    pub async fn write_plain(&self, data: &[u8]) -> io::Result<()> {
        {
            let mut s = self.lock();
            // Bounded by `data`: it is sent before more is taken.
            s.set_buffer_limit(None);
            io::Write::write_all(&mut s.writer(), data)?;
        }
        self.flush().await
    }

    /// Sends close_notify and a FIN: the client's stream ends here.
    pub async fn close_write(&self) -> io::Result<()> {
        self.lock().send_close_notify();
        self.flush().await?;
        net::half_close(&self.tcp)
    }

    /// Writes out every record the session holds, waiting for room.
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
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.tcp.writable().await?,
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for ciphertext, then reads and processes what has arrived,
    /// until the socket has no more or rustls holds PLAINTEXT_BATCH of
    /// plaintext; sends what that queued without waiting. While it waits,
    /// records still queued (TLS 1.2's last flight, when the socket was
    /// full) go out as the socket takes them: a client may be waiting for
    /// them before it says more. Ok(false): the end of the client's stream.
    pub async fn read_more(&self) -> Result<bool, Failed> {
        loop {
            if self.lock().wants_write() {
                tokio::select! {
                    r = self.tcp.readable() => r.map_err(Failed::Io)?,
                    r = self.tcp.writable() => {
                        r.map_err(Failed::Io)?;
                        // A failed socket ends the read instead of waking
                        // it again and again.
                        self.send_some().map_err(Failed::Io)?;
                        continue;
                    }
                }
            } else {
                self.tcp.readable().await.map_err(Failed::Io)?;
            }
            let read = self.read_ready();
            self.send_queued();
            if let Some(more) = read? {
                return Ok(more);
            }
        }
    }

    /// What `read_more` does once the socket is readable: None when it had
    /// nothing after all.
    fn read_ready(&self) -> Result<Option<bool>, Failed> {
        let mut s = self.lock();
        let mut read_any = false;
        loop {
            match s.read_tls(&mut Socket(&self.tcp)) {
                Ok(0) => {
                    s.process_new_packets().map_err(Failed::Tls)?;
                    return Ok(Some(false));
                }
                Ok(_) => {
                    read_any = true;
                    let state = s.process_new_packets().map_err(Failed::Tls)?;
                    if state.plaintext_bytes_to_read() >= PLAINTEXT_BATCH {
                        return Ok(Some(true));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(read_any.then_some(true)),
                Err(e) => return Err(Failed::Io(e)),
            }
        }
    }

    /// Sends what the session queued, as far as the socket takes it now;
    /// the rest is the writer's to send (`unsent` tells it), or goes while
    /// `read_more` waits.
    fn send_queued(&self) {
        if self.send_some().is_err() || self.lock().wants_write() {
            // Full, failed or closed: a failed socket shows in the next
            // read or write, which end the connection.
            self.unsent.notify_one();
        }
    }

    /// Writes queued records until the socket would block or none are left.
    fn send_some(&self) -> io::Result<()> {
        let mut s = self.lock();
        while s.wants_write() {
            match s.write_tls(&mut Socket(&self.tcp)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Reads the ClientHello, from `early` and then the socket, before any
/// answer: the certificate is chosen by its server name and by the
/// signature schemes the client can verify (`Terminate::pick`, which the
/// resolver follows too). Returns the session that answers it, the
/// certificate chosen, and what of `early` is left for that session.
async fn hello<'e>(
    tcp: &TcpStream,
    t: &Terminate,
    mut early: &'e [u8],
) -> Result<(ServerConnection, usize, &'e [u8]), HandshakeFailure> {
    let mut acceptor = Acceptor::default();
    loop {
        let read = match early.is_empty() {
            false => acceptor.read_tls(&mut early),
            true => {
                tcp.readable().await.map_err(|_| HandshakeFailure::Closed)?;
                acceptor.read_tls(&mut Socket(tcp))
            }
        };
        match read {
            Ok(0) => return Err(HandshakeFailure::Closed),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            // Too much for rustls to hold before the hello is whole.
            Err(e) if e.kind() == io::ErrorKind::Other => return Err(HandshakeFailure::Unreadable(e)),
            Err(_) => return Err(HandshakeFailure::Closed),
        }
        let (e, mut alert) = match acceptor.accept() {
            Ok(None) => continue,
            Ok(Some(accepted)) => {
                let hello = accepted.client_hello();
                let served = t.pick(hello.server_name(), hello.signature_schemes());
                match accepted.into_connection(t.server.clone()) {
                    Ok(session) => return Ok((session, served, early)),
                    Err(refused) => refused,
                }
            }
            Err(refused) => refused,
        };
        // The alert is a few bytes: the socket takes it now or never.
        let _ = alert.write_all(&mut Socket(tcp));
        return Err(HandshakeFailure::Tls(e));
    }
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

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
