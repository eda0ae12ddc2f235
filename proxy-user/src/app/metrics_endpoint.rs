//! `--metrics ADDR`: Prometheus scrapes `GET /metrics` here.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{datapath::Datapath, metrics::Metrics};

const MAX_REQUEST: usize = 8 * 1024;
const TIMEOUT: Duration = Duration::from_secs(5);

pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics: cannot bind {addr}"))
}

pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, datapath: Arc<Datapath>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (metrics, datapath) = (metrics.clone(), datapath.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(TIMEOUT, respond(stream, metrics, datapath)).await;
        });
    }
}

async fn respond(mut stream: TcpStream, metrics: Arc<Metrics>, datapath: Arc<Datapath>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let path = loop {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                break match (req.method, req.path) {
                    (Some("GET"), Some(p)) => p.split('?').next().unwrap_or("").to_string(),
                    _ => String::new(),
                };
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST => continue,
            _ => break String::new(),
        }
    };
    let (status, kind, body) = if path == "/metrics" {
        // Reading live eBPF counters makes syscalls; keep them off the runtime.
        let body = tokio::task::spawn_blocking(move || {
            // One scrape at a time: each reads every parked connection.
            static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            datapath.publish_kernel_bytes(&metrics);
            metrics.encode()
        })
            .await
            .unwrap_or_default();
        ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", body)
    } else {
        ("404 Not Found", "text/plain", "Metrics are at GET /metrics.\n".to_string())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
