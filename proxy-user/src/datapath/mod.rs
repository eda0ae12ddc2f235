//! Who carries a connection's bytes once it is set up: the kernel (eBPF
//! sockmap, kernel/) or the userspace relay (relay.rs). Decided once at
//! start-up, and said in the log.
pub mod carried;
mod kernel;
mod relay;

use std::{io, sync::Arc};

use anyhow::{Context as _, Result};

use self::{
    carried::{Carried, Preface, Totals},
    kernel::Kernel,
};
use crate::{
    config::OffloadMode,
    drain::Drain,
    metrics::{Direction, LiveBytes, Metrics, Path},
    net,
};

pub struct Datapath {
    /// None: the userspace relay carries every connection.
    kernel: Option<Kernel>,
    drain: Arc<Drain>,
}

impl Datapath {
    pub fn init(mode: OffloadMode, level: log::LevelFilter, drain: Arc<Drain>) -> Result<Datapath> {
        let kernel = match mode {
            OffloadMode::Userspace => {
                log::info!("offload: userspace (requested with --offload userspace)");
                None
            }
            OffloadMode::Sockmap => Some(
                Kernel::load(level, drain.clone())
                    .context("--offload sockmap: the eBPF sockmap offload cannot be used")?,
            ),
            OffloadMode::Auto => match Kernel::load(level, drain.clone()) {
                Ok(k) => Some(k),
                Err(e) => {
                    log::warn!("offload: userspace, because the eBPF sockmap offload is unavailable: {e:#}");
                    None
                }
            },
        };
        if let Some(k) = &kernel {
            log::info!("offload: sockmap (sk_skb stream verdict, prog id {})", k.prog_id());
        }
        Ok(Datapath { kernel, drain })
    }

    /// The offload in effect, as the metrics label it.
    pub fn mode(&self) -> &'static str {
        match self.kernel {
            Some(_) => "sockmap",
            None => "userspace",
        }
    }

    /// Writes the preface upstream and carries the connection until it
    /// ends (Some) or is parked in the kernel (None: its owner is told of
    /// the end).
    pub async fn carry(&self, conn: Carried, preface: Preface) -> io::Result<Option<Totals>> {
        let m = conn.owner.metrics();
        net::write_all(&conn.upstream, &preface.bytes).await?;
        // Once userspace has read from the client, it also forwards whatever
        // else is queued (see relay::forward_queued), so that the kernel only
        // ever gets untouched skbs. `consumed` then covers every byte userspace
        // took, so the FIN check knows all later ones went through the kernel.
        let mut early = 0;
        if preface.consumed > 0 {
            early = relay::forward_queued(&conn.client, &conn.upstream).await?;
            m.user_bytes(Direction::client_to_upstream).inc_by(early);
        }
        match &self.kernel {
            Some(k) => k.carry(conn, preface.consumed, early).await,
            None => {
                m.offloaded(Path::userspace);
                let totals = relay::relay(&self.drain, m, &conn.client, &conn.upstream, early).await;
                Ok(Some(totals))
            }
        }
    }

    /// Brings the kernel byte counters up to date for a metrics scrape,
    /// open connections included.
    pub fn publish_kernel_bytes(&self, metrics: &Metrics) {
        match &self.kernel {
            Some(k) => k.publish_kernel_bytes(metrics),
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
