//! Reading a preamble (a PROXY header, an upgrade request, the broker's
//! answer to it, a CONNECT) off a stream: bytes go into one buffer as they
//! arrive, and a `splicer_proto::preamble::Reader` says when the preamble
//! is whole. The end of the stream ends the read at once. Bytes that
//! arrive behind a preamble stay in the buffer for the next reader, and in
//! the end go on ahead of anything the kernel carries.
use std::{future::Future, io};

use splicer_proto::preamble::{Reader, Step};
use tokio::net::TcpStream;

/// How much is read at a time. Nothing is allocated before the first
/// byte (or the end of the stream) arrives.
pub const CHUNK: usize = 4096;

/// Where an Inbox's bytes come from: a socket (a PROXY header, the
/// broker's answer), or the client as it speaks after any TLS
/// (`client::Client`).
pub trait Source {
    /// Waits for bytes and appends what has arrived. Err at the end of the
    /// stream (a FIN: a half-closed handshake can never complete, so it
    /// ends here instead of waking the task again and again) or on an error.
    fn fill(&self, buf: &mut Vec<u8>) -> impl Future<Output = io::Result<()>> + Send;
}

pub struct Inbox<'a, S> {
    stream: &'a S,
    /// Received and not yet taken by a reader.
    buf: Vec<u8>,
}

/// Why no preamble was read.
#[derive(Debug)]
pub enum ReadError<E> {
    /// The reader refused what came.
    Refused(E),
    /// End of stream, or a socket error, before the preamble was whole.
    Closed,
}

impl<'a, S: Source + Sync> Inbox<'a, S> {
    pub fn new(stream: &'a S) -> Self {
        Self::resume(stream, Vec::new())
    }

    /// An inbox holding `held`: bytes an earlier inbox read past its
    /// preambles (from the same stream, before any TLS).
    pub fn resume(stream: &'a S, held: Vec<u8>) -> Self {
        Inbox { stream, buf: held }
    }

    pub fn stream(&self) -> &'a S {
        self.stream
    }

    /// Reads until `reader` has a whole preamble at the front of what was
    /// received; returns its value and its bytes, which leave the inbox.
    /// The caller bounds the time this may take.
    pub async fn read<R: Reader>(&mut self, reader: &mut R) -> Result<(R::Value, Vec<u8>), ReadError<R::Error>> {
        let (value, len) = self.look(reader).await?;
        Ok((value, self.buf.drain(..len).collect()))
    }

    /// Reads until `reader` has a whole preamble at the front of what was
    /// received, and leaves its bytes there: for a preamble that goes to
    /// the upstream as it came (an MQTT CONNECT, a TLS ClientHello), ahead
    /// of whatever followed it. Returns its value and its length.
    pub async fn look<R: Reader>(&mut self, reader: &mut R) -> Result<(R::Value, usize), ReadError<R::Error>> {
        loop {
            if !self.buf.is_empty() {
                match reader.step(&self.buf) {
                    Step::Done(value, len) => return Ok((value, len)),
                    Step::Fail(e) => return Err(ReadError::Refused(e)),
                    Step::More => {}
                }
            }
            if self.stream.fill(&mut self.buf).await.is_err() {
                return Err(ReadError::Closed);
            }
        }
    }

    /// Reads until at least `n` bytes are held (a response body the client
    /// is owed); false if the stream ends first.
    pub async fn fill_to(&mut self, n: usize) -> bool {
        while self.buf.len() < n {
            if self.stream.fill(&mut self.buf).await.is_err() {
                return false;
            }
        }
        true
    }

    /// What has arrived and not been taken: a refused preamble's bytes,
    /// for an answer in the client's own terms.
    pub fn held(&self) -> &[u8] {
        &self.buf
    }

    /// What arrived behind the preambles read, in a buffer of its size.
    pub fn into_rest(self) -> Vec<u8> {
        let mut rest = self.buf;
        rest.shrink_to_fit();
        rest
    }
}

impl Source for TcpStream {
    async fn fill(&self, buf: &mut Vec<u8>) -> io::Result<()> {
        loop {
            self.readable().await?;
            buf.reserve(CHUNK);
            match self.try_read_buf(buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}
