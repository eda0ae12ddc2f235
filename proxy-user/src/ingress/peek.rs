//! Reading a preamble (a PROXY header, an HTTP upgrade request) off a new
//! connection: peek until the parser says it is complete, then consume
//! exactly its length, so every later byte stays queued in the kernel.
// socket2's peek takes uninitialised memory; `uninit` below is the one
// cast, and says why it is sound.
#![allow(unsafe_code)]
use std::{io, mem::MaybeUninit};

use tokio::{io::Interest, net::TcpStream};

/// What the parser says about the bytes so far.
pub enum Step<T, E> {
    /// A complete preamble of this many bytes.
    Done(T, usize),
    /// Not enough bytes yet.
    More,
    Fail(E),
}

/// Why a preamble could not be read, besides what the parser rejects.
pub enum PeekError<E> {
    Parser(E),
    /// `max` bytes arrived and the parser still wanted more.
    TooLong,
    /// EOF or a socket error before the preamble was complete.
    Closed,
}

/// Peeks up to `max` bytes until `parse` completes, then consumes exactly
/// the preamble's bytes and returns them with the parser's result. The
/// caller bounds the time this may take.
pub async fn read_preamble<T, E>(
    stream: &TcpStream,
    max: usize,
    mut parse: impl FnMut(&[u8]) -> Step<T, E>,
) -> Result<(T, Vec<u8>), PeekError<E>> {
    let mut buf = vec![0u8; max];
    loop {
        stream.readable().await.map_err(|_| PeekError::Closed)?;
        let peeked = stream.try_io(Interest::READABLE, || {
            socket2::SockRef::from(stream).peek(uninit(&mut buf))
        });
        let n = match peeked {
            Ok(0) => return Err(PeekError::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return Err(PeekError::Closed),
        };
        match parse(&buf[..n]) {
            Step::Done(value, len) => {
                consume(stream, len).await?;
                buf.truncate(len);
                return Ok((value, buf));
            }
            Step::Fail(e) => return Err(PeekError::Parser(e)),
            Step::More if n == max => return Err(PeekError::TooLong),
            Step::More => {
                // The bytes stay queued; wait for more to arrive.
                let _ = stream.try_io(Interest::READABLE, || {
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
            }
        }
    }
}

/// Reads and drops exactly `len` bytes, already known to be queued.
async fn consume<E>(stream: &TcpStream, mut len: usize) -> Result<(), PeekError<E>> {
    let mut sink = vec![0u8; len];
    while len > 0 {
        stream.readable().await.map_err(|_| PeekError::Closed)?;
        match stream.try_read(&mut sink[..len]) {
            Ok(0) => return Err(PeekError::Closed),
            Ok(n) => len -= n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return Err(PeekError::Closed),
        }
    }
    Ok(())
}

fn uninit(buf: &mut [u8]) -> &mut [MaybeUninit<u8>] {
    // SAFETY: u8 and MaybeUninit<u8> have the same layout, and every u8 is
    // initialised; socket2 only writes into the slice.
    unsafe { &mut *(std::ptr::from_mut::<[u8]>(buf) as *mut [MaybeUninit<u8>]) }
}
