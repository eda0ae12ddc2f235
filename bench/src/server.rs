//! The server end of every TCP workload: strips the PROXY header the
//! forwarder put in front (direct clients send none), then discards or
//! echoes. One process serves every forwarder, so they all meet the same
//! server. Async (tokio) because the idle workload holds tens of thousands
//! of connections, where a thread each would cost more than the forwarder.
//! Its TLS listener, for the TLS workloads, hands each connection to a
//! blocking thread (tls::sink) once the PROXY header is read: those
//! workloads keep few connections open at a time.
use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context as _, Result};
use rustls::ServerConfig;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};

/// A listener terminating TLS in front of the same discard and echo.
pub struct TlsListen {
    pub addr: SocketAddr,
    pub config: Arc<ServerConfig>,
}

pub fn run(listen: SocketAddr, tls: Option<TlsListen>) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(async {
            let l = TcpListener::bind(listen)
                .await
                .with_context(|| format!("bind {listen}"))?;
            println!("listening on {listen}");
            if let Some(tls) = tls {
                let l = TcpListener::bind(tls.addr)
                    .await
                    .with_context(|| format!("bind {}", tls.addr))?;
                println!("listening on {} (TLS)", tls.addr);
                tokio::spawn(async move {
                    if let Err(e) = accept_tls(l, tls.config).await {
                        eprintln!("TLS listener: {e}");
                        std::process::exit(1);
                    }
                });
            }
            loop {
                let (s, peer) = l.accept().await?;
                tokio::spawn(async move {
                    if let Err(e) = serve(s).await {
                        // Resets at teardown are normal; anything the
                        // client checks shows up there as a failure.
                        if e.kind() != std::io::ErrorKind::ConnectionReset {
                            eprintln!("{peer}: {e}");
                        }
                    }
                });
            }
        })
}

async fn accept_tls(l: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<()> {
    loop {
        let (s, peer) = l.accept().await?;
        let config = config.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_tls(s, config).await {
                if e.kind() != std::io::ErrorKind::ConnectionReset {
                    eprintln!("{peer} (TLS): {e}");
                }
            }
        });
    }
}

/// Skips the PROXY header, then serves the connection on a blocking thread.
async fn serve_tls(s: TcpStream, config: Arc<ServerConfig>) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut r = BufReader::with_capacity(256, s);
    skip_proxy_header(&mut r).await?;
    // What was read past the header: the start of the ClientHello.
    let early = r.buffer().to_vec();
    let s = r.into_inner().into_std()?;
    tokio::task::spawn_blocking(move || crate::tls::sink(s, &early, config)).await?
}

async fn serve(s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    // Small: the header and command are a few bytes, and idle connections
    // keep this buffer for as long as they are held.
    let mut r = BufReader::with_capacity(256, s);
    skip_proxy_header(&mut r).await?;
    let mut cmd = [0u8; 1];
    if r.read_exact(&mut cmd).await.is_err() {
        return Ok(()); // a client that connected and left (readiness probes)
    }
    match cmd[0] {
        b'D' => discard(r).await,
        b'E' => echo(r).await,
        c => Err(std::io::Error::other(format!(
            "unknown command byte {c:#x}"
        ))),
    }
}

/// Skips a PROXY v1 line or v2 block if the stream starts with one.
async fn skip_proxy_header(r: &mut BufReader<TcpStream>) -> std::io::Result<()> {
    let bad = |what: &str| std::io::Error::other(format!("bad PROXY header: {what}"));
    match r.fill_buf().await?.first() {
        Some(b'P') => {
            let mut line = Vec::with_capacity(108);
            r.read_until(b'\n', &mut line).await?;
            if !line.starts_with(b"PROXY ") || !line.ends_with(b"\r\n") {
                return Err(bad("v1 line"));
            }
        }
        Some(b'\r') => {
            let mut fixed = [0u8; 16];
            r.read_exact(&mut fixed).await?;
            if &fixed[..12] != b"\r\n\r\n\0\r\nQUIT\n" {
                return Err(bad("v2 signature"));
            }
            let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
            r.read_exact(&mut vec![0u8; len]).await?;
        }
        _ => {}
    }
    Ok(())
}

/// Counts bytes until EOF, then sends the count (u64 LE): the client checks
/// it against what it sent.
async fn discard(mut r: BufReader<TcpStream>) -> std::io::Result<()> {
    let mut n = r.buffer().len() as u64;
    r.consume(n as usize);
    let mut s = r.into_inner();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match s.read(&mut buf).await? {
            0 => break,
            k => n += k as u64,
        }
    }
    s.write_all(&n.to_le_bytes()).await?;
    s.shutdown().await
}

/// Sends back whatever arrives, until EOF.
async fn echo(mut r: BufReader<TcpStream>) -> std::io::Result<()> {
    let early = r.buffer().to_vec();
    r.consume(early.len());
    let mut s = r.into_inner();
    s.write_all(&early).await?;
    let mut buf = [0u8; 2048];
    loop {
        match s.read(&mut buf).await? {
            0 => return s.shutdown().await,
            k => s.write_all(&buf[..k]).await?,
        }
    }
}
