//! A TCP client that writes its own segments (raw IPv4 socket), so a test
//! can send what no socket API would: segments that overlap ones already
//! sent, or that arrive out of order. It keeps just enough state for that:
//! the handshake, its own sequence numbers, and the peer's.
//!
//! The kernel answers the peer's SYN-ACK with a RST (no socket of its own holds
//! the raw client's port), so it runs where that RST is dropped: see
//! `Netns::drop_resets_from`.
use std::{
    fs::File,
    io::Write as _,
    mem::MaybeUninit,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

pub struct RawTcp {
    tx: Socket,
    rx: Socket,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    /// Sequence number of stream offset 0 (ISN + 1).
    base: u32,
    /// The peer's next sequence number (what we acknowledge).
    peer_next: u32,
}

impl RawTcp {
    /// Handshake from `src` (an address of this host) to `dst`.
    pub fn connect(src: SocketAddrV4, dst: SocketAddrV4) -> Result<RawTcp> {
        let tx = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))?;
        tx.bind(&SocketAddr::V4(SocketAddrV4::new(*src.ip(), 0)).into())?;
        let rx = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))?;
        rx.set_read_timeout(Some(Duration::from_millis(200)))?;
        let isn = 0x1234_5678;
        let mut c = RawTcp {
            tx,
            rx,
            src,
            dst,
            base: isn + 1,
            peer_next: 0,
        };
        c.segment(isn, SYN, &[])?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            ensure!(Instant::now() < deadline, "no SYN-ACK from {dst}");
            if let Some((seq, flags, _)) = c.receive()? {
                if flags & (SYN | ACK) == SYN | ACK {
                    c.peer_next = seq.wrapping_add(1);
                    break;
                }
            }
        }
        c.segment(c.base, ACK, &[])?;
        Ok(c)
    }

    /// Sends `data` as the bytes at stream offset `offset`, in one segment.
    pub fn send_at(&self, offset: u32, data: &[u8]) -> Result<()> {
        self.segment(self.base.wrapping_add(offset), ACK | PSH, data)
    }

    /// Sends FIN after `len` bytes of stream.
    pub fn fin_at(&self, len: u32) -> Result<()> {
        self.segment(self.base.wrapping_add(len), ACK | FIN, &[])
    }

    fn segment(&self, seq: u32, flags: u8, data: &[u8]) -> Result<()> {
        let mut seg = Vec::with_capacity(20 + data.len());
        seg.extend_from_slice(&self.src.port().to_be_bytes());
        seg.extend_from_slice(&self.dst.port().to_be_bytes());
        seg.extend_from_slice(&seq.to_be_bytes());
        seg.extend_from_slice(&self.peer_next.to_be_bytes());
        seg.extend_from_slice(&[5 << 4, flags]);
        seg.extend_from_slice(&u16::MAX.to_be_bytes()); // window
        seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        seg.extend_from_slice(data);
        let sum = checksum(*self.src.ip(), *self.dst.ip(), &seg);
        seg[16..18].copy_from_slice(&sum.to_be_bytes());
        let to = SockAddr::from(SocketAddrV4::new(*self.dst.ip(), 0));
        let n = self.tx.send_to(&seg, &to).context("raw send")?;
        ensure!(n == seg.len(), "raw send: {n} of {} bytes", seg.len());
        Ok(())
    }

    /// The next segment from the peer to us: (seq, flags, payload length).
    fn receive(&self) -> Result<Option<(u32, u8, usize)>> {
        let mut buf = [MaybeUninit::<u8>::uninit(); 65536];
        let n = match self.rx.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Ok(None)
            }
            Err(e) => return Err(e.into()),
        };
        // SAFETY: recv initialised the first n bytes.
        let p: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
        let ihl = usize::from(p[0] & 0x0f) * 4;
        let t = &p[ihl..];
        let (sport, dport) = (u16::from_be_bytes([t[0], t[1]]), u16::from_be_bytes([t[2], t[3]]));
        if sport != self.dst.port() || dport != self.src.port() {
            return Ok(None);
        }
        let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
        let doff = usize::from(t[12] >> 4) * 4;
        Ok(Some((seq, t[13], t.len() - doff)))
    }
}

/// The TCP checksum over the IPv4 pseudo-header and the segment.
fn checksum(src: Ipv4Addr, dst: Ipv4Addr, seg: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&[0, 6]);
    add(&(seg.len() as u16).to_be_bytes());
    add(seg);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A network namespace of the test's own, deleted on drop. Its loopback
/// is up; `enter` moves the calling thread into it, so that sockets the
/// thread opens and processes it spawns live there.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(tag: &str) -> Result<Netns> {
        let name = format!("splicer-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// Drops the RSTs the kernel sends from `src` (see RawTcp).
    pub fn drop_resets_from(&self, src: Ipv4Addr) -> Result<()> {
        self.nft(&format!(
            "table inet splicer_test {{\n chain out {{\n  type filter hook output priority 0;\n  \
             ip saddr {src} tcp flags rst drop\n }}\n}}\n"
        ))
    }

    /// Adds nftables `rules` (nft -f syntax) inside the namespace.
    pub fn nft(&self, rules: &str) -> Result<()> {
        let mut nft = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .context("running nft (Debian package nftables)")?;
        nft.stdin.take().context("nft stdin")?.write_all(rules.as_bytes())?;
        ensure!(nft.wait()?.success(), "nft refused {rules}");
        Ok(())
    }

    /// Moves the calling thread into the namespace.
    pub fn enter(&self) -> Result<()> {
        let f = File::open(format!("/run/netns/{}", self.name))?;
        // SAFETY: setns on an open namespace file; it affects this thread only.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}
