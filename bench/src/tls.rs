//! The TLS workloads: a rustls client (full handshakes, bulk) and the
//! server's TLS sink, blocking like the TCP workloads.
//!
//! The client offers one protocol version, one cipher suite and one key
//! exchange group, so whichever end terminates (splicer's rustls, HAProxy's
//! or nginx's OpenSSL, the sink) settles on the same: what differs between
//! forwarders is their code, not what they were asked to compute.
use std::{
    io::{self, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use rustls::{
    client::Resumption,
    crypto::{ring, CryptoProvider},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned,
};
use serde_json::{json, Value};

use crate::{client, net};

/// Reads and writes of bulk data.
const CHUNK: usize = 256 * 1024;

/// TLS 1.3, AES-128-GCM, X25519: what every TLS workload negotiates.
fn offered() -> CryptoProvider {
    CryptoProvider {
        cipher_suites: vec![ring::cipher_suite::TLS13_AES_128_GCM_SHA256],
        kx_groups: vec![ring::kx_group::X25519],
        ..ring::default_provider()
    }
}

/// A client trusting only one CA, never resuming: every connection makes
/// a full handshake.
pub struct Client {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl Client {
    pub fn new(ca: &Path, server_name: &str) -> Result<Client> {
        let mut roots = RootCertStore::empty();
        for cert in
            CertificateDer::pem_file_iter(ca).with_context(|| format!("{}", ca.display()))?
        {
            roots.add(cert?)?;
        }
        let mut config = ClientConfig::builder_with_provider(Arc::new(offered()))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.resumption = Resumption::disabled();
        Ok(Client {
            config: Arc::new(config),
            name: ServerName::try_from(server_name.to_string())?,
        })
    }

    /// A connection to `target` with its handshake done (and the server's
    /// certificate checked).
    fn connect(&self, target: SocketAddr) -> Result<StreamOwned<ClientConnection, TcpStream>> {
        let mut tcp = net::connect(target)?;
        let mut tls = ClientConnection::new(self.config.clone(), self.name.clone())?;
        while tls.is_handshaking() {
            tls.complete_io(&mut tcp).context("TLS handshake")?;
        }
        Ok(StreamOwned::new(tls, tcp))
    }
}

/// `conns` connections, `concurrency` at a time, each a full handshake,
/// 8 bytes echoed by the server (so a terminating forwarder really connects
/// upstream and forwards) and a close.
pub fn handshakes(
    client: Client,
    target: SocketAddr,
    conns: usize,
    concurrency: usize,
    max_time: Duration,
) -> Result<Value> {
    client::connrate(target, conns, concurrency, max_time, move |target, i| {
        let mut s = client.connect(target)?;
        let mut msg = [b'E'; 9];
        msg[1..].copy_from_slice(&i.to_le_bytes());
        s.write_all(&msg)?;
        let mut back = [0u8; 8];
        s.read_exact(&mut back)
            .context("no echo after the handshake")?;
        ensure!(back == msg[1..], "echo differs");
        s.conn.send_close_notify();
        s.flush()?;
        Ok(())
    })
}

/// `bytes` through one TLS connection to the server in discard mode
/// (stopping early at `max_time`); the server's count, sent back when the
/// client's stream ends (close_notify and FIN), must equal what was sent.
pub fn bulk(client: &Client, target: SocketAddr, bytes: u64, max_time: Duration) -> Result<Value> {
    let start = Instant::now();
    let deadline = start + max_time;
    let mut s = client.connect(target)?;
    // Encrypt each whole write at once instead of 64 KiB at a time.
    s.conn.set_buffer_limit(None);
    s.write_all(b"D")?;
    let buf = vec![0x5a_u8; CHUNK];
    let mut sent = 0u64;
    while sent < bytes && Instant::now() < deadline {
        let n = (bytes - sent).min(CHUNK as u64) as usize;
        s.write_all(&buf[..n])
            .with_context(|| format!("write after {sent} bytes"))?;
        sent += n as u64;
    }
    s.conn.send_close_notify();
    s.flush()?;
    s.sock.shutdown(Shutdown::Write)?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count)
        .with_context(|| format!("no byte count from the server after sending {sent}"))?;
    let got = u64::from_le_bytes(count);
    ensure!(got == sent, "the server received {got} of {sent} bytes");
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({
        "bytes": sent,
        "conns": 1,
        "secs": secs,
        "gb_per_s": sent as f64 / secs / 1e9,
        "stopped_by_time": sent < bytes,
    }))
}

/// The sink's configuration: one certificate chain and key, rustls's
/// defaults otherwise (the client's offer decides the rest).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("{}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("{}", key.display()))?;
    let config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// The server end of a TLS connection whose first bytes (read behind a
/// PROXY header) are `early`: after the handshake, the same command byte
/// and discard or echo as on plaintext connections.
pub fn sink(tcp: TcpStream, mut early: &[u8], config: Arc<ServerConfig>) -> io::Result<()> {
    tcp.set_nonblocking(false)?;
    let mut tls = ServerConnection::new(config).map_err(io::Error::other)?;
    while !early.is_empty() {
        tls.read_tls(&mut early)?;
    }
    tls.process_new_packets().map_err(io::Error::other)?;
    let sock = Buffered {
        r: BufReader::with_capacity(CHUNK, tcp.try_clone()?),
        w: tcp,
    };
    let mut s = StreamOwned::new(tls, sock);
    let mut cmd = [0u8; 1];
    if s.read_exact(&mut cmd).is_err() {
        return Ok(()); // handshake only (openssl s_time), or a probe
    }
    let echo = match cmd[0] {
        b'D' => false,
        b'E' => true,
        c => return Err(io::Error::other(format!("unknown command byte {c:#x}"))),
    };
    let mut buf = vec![0u8; CHUNK];
    let mut count = 0u64;
    loop {
        let n = match s.read(&mut buf) {
            Ok(n) => n,
            // The client's FIN without close_notify: the end all the same
            // (the count tells whether anything was lost).
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e),
        };
        if n == 0 {
            if !echo {
                s.write_all(&count.to_le_bytes())?;
                s.flush()?;
            }
            // A courtesy: the client may have closed already (after
            // its echo), and it has all it waits for.
            s.conn.send_close_notify();
            let _ = s.flush();
            let _ = s.sock.w.shutdown(Shutdown::Write);
            return Ok(());
        }
        if echo {
            s.write_all(&buf[..n])?;
        } else {
            count += n as u64;
        }
    }
}

/// The socket with its reads buffered: rustls reads at most 4 KiB at a
/// time, which would be four syscalls per 16 KiB record of bulk.
struct Buffered {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Read for Buffered {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.r.read(buf)
    }
}

impl Write for Buffered {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.w.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.w.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}
