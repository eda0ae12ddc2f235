//! `--handoff auto` (HAProxy's splice-auto idea): a connection is relayed in
//! userspace first and handed to the kernel once it goes idle or carries a
//! bulk stream. Short connections stay in userspace; bulk and idle ones end
//! in the kernel; every byte arrives once and in order across the move,
//! with traffic in both directions at the moment it happens.
use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, TcpStream},
    thread,
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use splicer_tests::*;

/// splicer with `--handoff auto` in front of a listener of the test's, and
/// one client connection through it: (splicer, client side, upstream side).
fn connected(name: &str) -> Result<(Splicer, TcpStream, TcpStream)> {
    let dir = scratch(name);
    let (listener, upstream) = listen_on(BROKER_IP)?;
    let splicer = splicer_in_mode(&dir, "sockmap", upstream, &["--handoff", "auto"])?;
    let c = connect_from_client(splicer.listen)?;
    let (u, _) = listener.accept()?;
    Ok((splicer, c, u))
}

/// A short exchange ends before any handoff: no kernel bytes, no psock.
#[test]
fn short_connection_stays_in_userspace() -> Result<()> {
    let (splicer, mut c, mut u) = connected("handoff-short")?;
    c.write_all(b"ping")?;
    let mut got = [0u8; 4];
    u.read_exact(&mut got)?;
    ensure!(&got == b"ping");
    u.write_all(b"pong")?;
    c.read_exact(&mut got)?;
    ensure!(&got == b"pong");
    drop((c, u));
    let line = splicer.wait_closed(1, Duration::from_secs(5))?.remove(0);
    ensure!(close_num(&line, "kernel_bytes")? == 0, "{line}");
    ensure!(close_num(&line, "client_to_upstream")? == 4, "{line}");
    Ok(())
}

/// 64 MiB up and 32 MiB down at the same time: the bulk direction moves
/// the connection into the kernel mid-stream, and both streams arrive whole.
#[test]
fn bulk_moves_to_the_kernel_mid_stream() -> Result<()> {
    const UP: u64 = 64 << 20;
    const DOWN: u64 = 32 << 20;
    let (splicer, mut c, mut u) = connected("handoff-bulk")?;
    let (mut c2, mut u2) = (c.try_clone()?, u.try_clone()?);
    let up = thread::spawn(move || -> Result<()> {
        send_pattern(&mut c2, 21, UP)?;
        c2.shutdown(Shutdown::Write)?;
        Ok(())
    });
    let down = thread::spawn(move || -> Result<()> {
        send_pattern(&mut u2, 22, DOWN)?;
        u2.shutdown(Shutdown::Write)?;
        Ok(())
    });
    let check_up = thread::spawn(move || expect_pattern(&mut u, 21, UP).context("client->upstream"));
    expect_pattern(&mut c, 22, DOWN).context("upstream->client")?;
    check_up.join().unwrap()?;
    up.join().unwrap()?;
    down.join().unwrap()?;
    drop(c);
    let line = splicer.wait_closed(1, Duration::from_secs(10))?.remove(0);
    ensure!(close_num(&line, "client_to_upstream")? == UP, "{line}");
    ensure!(close_num(&line, "upstream_to_client")? == DOWN, "{line}");
    ensure!(
        close_num(&line, "kernel_bytes")? > UP / 2,
        "the bulk stream was not handed to the kernel: {line}"
    );
    Ok(())
}

/// A connection that goes quiet (an MQTT client between packets) is
/// handed over; what it sends afterwards goes through the kernel.
#[test]
fn idle_connection_is_handed_over() -> Result<()> {
    let (splicer, mut c, mut u) = connected("handoff-idle")?;
    c.write_all(b"CONNECT")?;
    let mut got = [0u8; 7];
    u.read_exact(&mut got)?;
    ensure!(&got == b"CONNECT");
    // Idle for longer than the handoff's 2 s (checked every 2 s).
    thread::sleep(Duration::from_millis(4500));
    // Each direction then carries 1 MiB and a FIN through the kernel.
    let (mut c2, mut u2) = (c.try_clone()?, u.try_clone()?);
    let up = thread::spawn(move || -> std::io::Result<()> {
        send_pattern(&mut c2, 23, 1 << 20)?;
        c2.shutdown(Shutdown::Write)
    });
    expect_pattern(&mut u, 23, 1 << 20)?;
    up.join().unwrap()?;
    let down = thread::spawn(move || -> std::io::Result<()> {
        send_pattern(&mut u2, 24, 1 << 20)?;
        u2.shutdown(Shutdown::Write)
    });
    expect_pattern(&mut c, 24, 1 << 20)?;
    down.join().unwrap()?;
    drop((c, u));
    let line = splicer.wait_closed(1, Duration::from_secs(5))?.remove(0);
    ensure!(
        close_num(&line, "kernel_bytes")? == 2 << 20,
        "after the idle handoff the kernel should carry exactly the 2 MiB: {line}"
    );
    ensure!(close_num(&line, "client_to_upstream")? == 7 + (1 << 20), "{line}");
    Ok(())
}

/// A half-close before any handoff keeps the connection in userspace,
/// the other direction still open.
#[test]
fn half_close_before_handoff_finishes_in_userspace() -> Result<()> {
    let (splicer, mut c, mut u) = connected("handoff-halfclose")?;
    send_pattern(&mut c, 25, 100_000)?;
    c.shutdown(Shutdown::Write)?;
    let mut all = Vec::new();
    u.set_read_timeout(Some(Duration::from_secs(5)))?;
    u.read_to_end(&mut all)?;
    ensure!(all.len() == 100_000, "upstream got {} bytes", all.len());
    let down = thread::spawn(move || -> std::io::Result<()> {
        send_pattern(&mut u, 26, 3 << 20)?;
        u.shutdown(Shutdown::Write)
    });
    expect_pattern(&mut c, 26, 3 << 20)?;
    down.join().unwrap()?;
    let line = splicer.wait_closed(1, Duration::from_secs(5))?.remove(0);
    ensure!(line.contains("end=client closed"), "{line}");
    ensure!(close_num(&line, "upstream_to_client")? == 3 << 20, "{line}");
    Ok(())
}

/// With the userspace offload `--handoff auto` changes nothing: there is
/// no kernel to hand over to.
#[test]
fn userspace_offload_ignores_handoff() -> Result<()> {
    let dir = scratch("handoff-userspace");
    let (listener, upstream) = listen_on(BROKER_IP)?;
    let splicer = splicer_in_mode(&dir, "userspace", upstream, &["--handoff", "auto"])?;
    let mut c = connect_from_client(splicer.listen)?;
    let (mut u, _) = listener.accept()?;
    let up = thread::spawn(move || -> std::io::Result<()> {
        send_pattern(&mut c, 27, 8 << 20)?;
        c.shutdown(Shutdown::Write)
    });
    expect_pattern(&mut u, 27, 8 << 20)?;
    up.join().unwrap()?;
    drop(u);
    let line = splicer.wait_closed(1, Duration::from_secs(5))?.remove(0);
    ensure!(close_num(&line, "kernel_bytes")? == 0, "{line}");
    Ok(())
}

/// Bytes dripped one at a time, before the idle handoff and after it,
/// arrive once and in order, the later ones through the kernel.
#[test]
fn dripped_bytes_cross_the_handoff_in_order() -> Result<()> {
    let (splicer, mut c, mut u) = connected("handoff-drip")?;
    let mut stream = vec![0u8; 40];
    Pattern::new(28).fill(&mut stream);
    let drip = |c: &mut TcpStream, bytes: &[u8]| -> Result<()> {
        for b in bytes {
            c.write_all(std::slice::from_ref(b))?;
            thread::sleep(Duration::from_millis(30));
        }
        Ok(())
    };
    drip(&mut c, &stream[..20])?;
    thread::sleep(Duration::from_millis(4500));
    drip(&mut c, &stream[20..])?;
    c.shutdown(Shutdown::Write)?;
    let mut got = Vec::new();
    u.set_read_timeout(Some(Duration::from_secs(5)))?;
    u.read_to_end(&mut got)?;
    ensure!(got == stream, "upstream got {} bytes, not the 40 sent in order", got.len());
    drop((c, u));
    let line = splicer.wait_closed(1, Duration::from_secs(5))?.remove(0);
    ensure!(
        close_num(&line, "kernel_bytes")? == 20,
        "the 20 bytes after the idle handoff should go through the kernel: {line}"
    );
    Ok(())
}
