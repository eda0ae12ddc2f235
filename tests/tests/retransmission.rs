//! TCP can queue an skb that starts before what it has already delivered:
//! a retransmission its sender cut differently from the first send, or an
//! out-of-order segment that overlaps the one filling the hole before it.
//! Linux's own readers skip those bytes; the sockmap verdict is handed the
//! skb whole (`tcp_read_skb`), so before splicer cut them off the broker
//! got them twice. A raw-socket client sends exactly such segments; the
//! upstream must get every byte once and in order, in both offload modes.
use std::{
    io::Read as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener},
    thread,
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use splicer_tests::{rawtcp::{Netns, RawTcp}, *};

/// The raw client's address: only its RSTs are dropped.
const RAW_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 9);

/// Sends `segments` (stream offset ranges, in this order) and a FIN after
/// the last byte, through splicer in `mode`; returns what the upstream
/// received after the PROXY header and the close line.
fn through_splicer(mode: &'static str, segments: &'static [(u32, u32)]) -> Result<(Vec<u8>, Vec<u8>, String)> {
    let ns = Netns::create("rtx")?;
    ns.drop_resets_from(RAW_IP)?;
    // Everything below lives in the namespace: this thread's sockets and
    // the processes it spawns.
    thread::spawn(move || -> Result<_> {
        ns.enter()?;
        let dir = scratch(&format!("retransmission-{mode}"));
        let upstream = TcpListener::bind("127.0.0.1:0")?;
        let up_addr = upstream.local_addr()?;
        let splicer = splicer_in_mode(&dir, mode, up_addr, &["--send-proxy", "v1"])?;
        let SocketAddr::V4(listen) = splicer.listen else { unreachable!() };
        let end = segments.iter().map(|s| s.1).max().unwrap_or(0);
        let mut stream = vec![0u8; end as usize];
        Pattern::new(7).fill(&mut stream);

        let client = RawTcp::connect(SocketAddrV4::new(RAW_IP, 40_009), listen)?;
        let (mut up, _) = upstream.accept()?;
        read_proxy_header(&mut up)?;
        // Let splicer hand the connection to the kernel before any data.
        thread::sleep(Duration::from_millis(300));
        for &(from, to) in segments {
            client.send_at(from, &stream[from as usize..to as usize])?;
            thread::sleep(Duration::from_millis(50));
        }
        client.fin_at(end)?;
        up.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut got = Vec::new();
        up.read_to_end(&mut got).context("upstream read")?;
        drop(up);
        let line = splicer
            .wait_closed(1, Duration::from_secs(5))
            .map(|l| l.join("\n"))
            .unwrap_or_else(|_| splicer.proc.output());
        drop(ns);
        Ok((stream, got, line))
    })
    .join()
    .expect("namespace thread panicked")
}

fn check(mode: &'static str, segments: &'static [(u32, u32)]) -> Result<()> {
    let (sent, got, line) = through_splicer(mode, segments)?;
    ensure!(
        got.len() == sent.len(),
        "{mode}: the upstream got {} bytes of a {}-byte stream (segments {segments:?})\n{line}",
        got.len(),
        sent.len()
    );
    if let Some(at) = got.iter().zip(&sent).position(|(a, b)| a != b) {
        anyhow::bail!("{mode}: first wrong byte at offset {at} (segments {segments:?})");
    }
    ensure!(
        close_num(&line, "client_to_upstream")? == sent.len() as u64,
        "{mode}: close line counts otherwise: {line}"
    );
    if mode == "sockmap" {
        // The point is the kernel path: it, not userspace, carried them.
        ensure!(
            close_num(&line, "kernel_bytes")? >= sent.len() as u64,
            "the kernel did not carry the client's bytes: {line}"
        );
    }
    Ok(())
}

/// A retransmission that starts inside data already delivered.
const OVERLAPS_DELIVERED: &[(u32, u32)] = &[(0, 1000), (500, 3000), (3000, 3100)];
/// An overlap larger than one cut of the verdict program (4095 bytes).
const OVERLAPS_MANY_CUTS: &[(u32, u32)] = &[(0, 20_000), (3000, 40_000)];
/// An out-of-order segment that the hole-filling one overlaps: TCP moves
/// it into the receive queue whole, behind the filler.
const OUT_OF_ORDER_OVERLAP: &[(u32, u32)] = &[(10_000, 30_000), (0, 15_000), (30_000, 31_000)];

#[test]
fn overlapping_retransmission_forwarded_once_sockmap() -> Result<()> {
    check("sockmap", OVERLAPS_DELIVERED)
}

#[test]
fn overlapping_retransmission_forwarded_once_userspace() -> Result<()> {
    check("userspace", OVERLAPS_DELIVERED)
}

#[test]
fn overlap_of_many_cuts_forwarded_once_sockmap() -> Result<()> {
    check("sockmap", OVERLAPS_MANY_CUTS)
}

#[test]
fn out_of_order_overlap_forwarded_once_sockmap() -> Result<()> {
    check("sockmap", OUT_OF_ORDER_OVERLAP)
}

#[test]
fn out_of_order_overlap_forwarded_once_userspace() -> Result<()> {
    check("userspace", OUT_OF_ORDER_OVERLAP)
}
