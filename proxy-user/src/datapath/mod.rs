//! Who carries a connection's bytes once it is set up: the kernel (eBPF
//! sockmap, kernel/) or the userspace relay (relay.rs). Decided once at
//! start-up, and said in the log.
pub mod carried;
mod kernel;
mod relay;
mod tls_relay;

use std::{io, sync::Arc};

use anyhow::{Context as _, Result};

use self::{
    carried::{Carried, Early, Read, Totals},
    kernel::Kernel,
};
use crate::{
    config::{Handoff, OffloadMode},
    drain::Drain,
    metrics::{Direction, LiveBytes, Metrics, Path},
    net,
    tls::conn::TlsConn,
};

pub struct Datapath {
    /// None: the userspace relay carries every connection.
    kernel: Option<Kernel>,
    /// When the kernel takes a connection over.
    handoff: Handoff,
    drain: Arc<Drain>,
}

impl Datapath {
    /// `max_buffered`: see `Config::max_buffered`.
    pub fn init(
        mode: OffloadMode,
        handoff: Handoff,
        level: log::LevelFilter,
        max_buffered: Option<u64>,
        drain: Arc<Drain>,
    ) -> Result<Datapath> {
        let kernel = match mode {
            OffloadMode::Userspace => {
                log::info!("offload: userspace (requested with --offload userspace)");
                None
            }
            OffloadMode::Sockmap => Some(
                Kernel::load(level, max_buffered, drain.clone())
                    .context("--offload sockmap: the eBPF sockmap offload cannot be used")?,
            ),
            OffloadMode::Auto => match Kernel::load(level, max_buffered, drain.clone()) {
                Ok(k) => Some(k),
                Err(e) => {
                    log::warn!("offload: userspace, because the eBPF sockmap offload is unavailable: {e:#}");
                    None
                }
            },
        };
        if let Some(k) = &kernel {
            log::info!(
                "offload: sockmap (sk_skb stream verdict, prog id {}; max-buffered {}; handoff {})",
                k.prog_id(),
                bytesize::ByteSize(k.budget().cap()).display().iec(),
                match handoff {
                    Handoff::Now => "now",
                    Handoff::Auto => "auto",
                }
            );
        }
        Ok(Datapath {
            kernel,
            handoff,
            drain,
        })
    }

    /// The offload in effect, as the metrics label it.
    pub fn mode(&self) -> &'static str {
        match self.kernel {
            Some(_) => "sockmap",
            None => "userspace",
        }
    }

    /// Forwards what userspace read early and carries the connection until
    /// it ends (Some) or is parked in the kernel (None: its owner is told
    /// of the end).
    pub async fn carry(&self, conn: Carried, early: Early) -> io::Result<Option<Totals>> {
        let m = conn.owner.metrics();
        let Early {
            consumed,
            client: early_client,
            upstream: early_upstream,
            sent_to_client,
        } = early;
        // What userspace read past a preamble goes on first. Whatever is
        // still queued stays for the kernel path, which cuts off the front
        // of an skb that userspace read in part (README, How the kernel path
        // works, step 10). The counts cover every byte userspace took, so
        // the FIN check knows all later ones went through the kernel.
        let c2u = early_client.len() as u64;
        net::write_all(&conn.upstream, &early_client).await?;
        drop(early_client);
        let u2c = sent_to_client + early_upstream.len() as u64;
        net::write_all(&conn.client, &early_upstream).await?;
        drop(early_upstream);
        m.user_bytes(Direction::client_to_upstream).inc_by(c2u);
        m.user_bytes(Direction::upstream_to_client).inc_by(u2c);
        let read = Read {
            consumed,
            c2u,
            u2c,
        };
        match &self.kernel {
            Some(k) if self.handoff == Handoff::Auto => {
                match relay::relay_or_promote(&self.drain, m, &conn.client, &conn.upstream, read).await {
                    Ok(totals) => {
                        m.offloaded(Path::userspace);
                        Ok(Some(totals))
                    }
                    Err(read) => k.carry(conn, read).await,
                }
            }
            Some(k) => k.carry(conn, read).await,
            None => {
                m.offloaded(Path::userspace);
                let totals = relay::relay(&self.drain, m, &conn.client, &conn.upstream, read).await;
                Ok(Some(totals))
            }
        }
    }

    /// A connection whose TLS this listener terminated: relayed in
    /// userspace, where the bytes are decrypted. (Kernel TLS could hand
    /// these to the kernel too; not on this kernel, which has no `tls`
    /// ULP, so there is no such path to test. It would go here.)
    pub async fn carry_tls(&self, conn: Carried<TlsConn>, early: Early) -> io::Result<Totals> {
        let m = conn.owner.metrics();
        let c2u = early.client.len() as u64;
        net::write_all(&conn.upstream, &early.client).await?;
        let u2c = early.sent_to_client + early.upstream.len() as u64;
        conn.client.write_plain(&early.upstream).await?;
        drop(early);
        m.user_bytes(Direction::client_to_upstream).inc_by(c2u);
        m.user_bytes(Direction::upstream_to_client).inc_by(u2c);
        m.offloaded(Path::userspace);
        let read = Read { consumed: 0, c2u, u2c };
        Ok(tls_relay::relay(&self.drain, m, &conn.client, &conn.upstream, read).await)
    }

    /// Brings the kernel byte counters up to date for a metrics scrape,
    /// open connections included, and the buffer budget's gauges.
    pub fn publish_kernel_bytes(&self, metrics: &Metrics) {
        match &self.kernel {
            Some(k) => {
                k.publish_kernel_bytes(metrics);
                let b = k.budget();
                metrics.publish_buffer_budget(b.cap(), b.granted(), b.refused());
            }
            None => metrics.publish_kernel_bytes(&LiveBytes::default()),
        }
    }

    /// The end of a drain: every live connection closes now.
    pub fn close_all(&self) {
        self.drain.force();
        if let Some(k) = &self.kernel {
            k.wake_all();
        }
    }
}
