//! Deciding, once at start-up, who carries the bulk bytes: the kernel
//! (eBPF sockmap) or the userspace relay, and saying so.
use anyhow::{Context as _, Result};

use crate::{config::OffloadMode, ebpf_maps::Maps, watch::Watcher};

pub enum Offload {
    Sockmap(Box<Maps>),
    Userspace,
}

impl Offload {
    pub fn init(mode: OffloadMode, level: log::LevelFilter) -> Result<Offload> {
        match mode {
            OffloadMode::Userspace => {
                log::info!("offload: userspace (requested with --offload userspace)");
                Ok(Offload::Userspace)
            }
            OffloadMode::Sockmap => {
                let maps = load(level)
                    .context("--offload sockmap: the eBPF sockmap offload cannot be used")?;
                log::info!(
                    "offload: sockmap (sk_skb stream verdict, prog id {})",
                    maps.prog_id
                );
                Ok(Offload::Sockmap(Box::new(maps)))
            }
            OffloadMode::Auto => match load(level) {
                Ok(maps) => {
                    log::info!(
                        "offload: sockmap (sk_skb stream verdict, prog id {})",
                        maps.prog_id
                    );
                    Ok(Offload::Sockmap(Box::new(maps)))
                }
                Err(e) => {
                    log::warn!("offload: userspace, because the eBPF sockmap offload is unavailable: {e:#}");
                    Ok(Offload::Userspace)
                }
            },
        }
    }

    pub fn maps(&self) -> Option<&Maps> {
        match self {
            Offload::Sockmap(m) => Some(m),
            Offload::Userspace => None,
        }
    }
}

/// The maps and program, plus the FIN/RST watcher spliced sockets need.
fn load(level: log::LevelFilter) -> Result<Maps> {
    let maps = Maps::load(level)?;
    Watcher::get().context("starting the splice watcher")?;
    Ok(maps)
}
