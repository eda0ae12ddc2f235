//! The client's side of a connection while its preambles are read and
//! answered: its socket, or a TLS session over it that this listener
//! terminates. Readers and refusals go through here, so the upgrade
//! request, the CONNECT and their answers are the same code in plaintext
//! and in TLS.
use std::io;

use tokio::net::TcpStream;

use super::inbox::{Source, CHUNK};
use crate::{net, tls::conn::TlsConn};

pub enum Client {
    Plain(TcpStream),
    Tls(Box<TlsConn>),
}

impl Client {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Client::Plain(t) => t,
            Client::Tls(c) => c.tcp(),
        }
    }

    pub async fn write_all(&self, data: &[u8]) -> io::Result<()> {
        match self {
            Client::Plain(t) => net::write_all(t, data).await,
            Client::Tls(c) => c.write_plain(data).await,
        }
    }

    /// Writes a refusal (an HTTP answer, a CONNACK) and ends the stream:
    /// over TLS with close_notify, then FIN.
    pub async fn answer_and_close(&self, answer: &[u8]) {
        match self {
            Client::Plain(t) => net::answer_and_close(t, answer).await,
            Client::Tls(c) => {
                let saying = async {
                    c.write_plain(answer).await?;
                    c.close_write().await
                };
                net::say_then_close(c.tcp(), saying).await;
            }
        }
    }
}

impl Source for Client {
    async fn fill(&self, buf: &mut Vec<u8>) -> io::Result<()> {
        match self {
            Client::Plain(t) => t.fill(buf).await,
            Client::Tls(c) => match c.read_plain(buf, CHUNK).await? {
                0 => Err(io::ErrorKind::UnexpectedEof.into()),
                _ => Ok(()),
            },
        }
    }
}
