//! Where the verdict program finds two fields of this kernel's own
//! structures (see `already_delivered` in proxy-ebpf): an skb's TCP
//! sequence number and a socket's `copied_seq`. Their offsets change with
//! the kernel's version and configuration, so they are read from the
//! kernel's BTF and handed to the program as constants before it loads.
use anyhow::{anyhow, Context, Result};
use btf_rs::{Btf, Struct, Type};

/// Byte offsets, as the program's globals of the same meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// `TCP_SKB_CB(skb)->seq` from the start of `struct sk_buff`.
    pub skb_seq: u32,
    /// `copied_seq` from the start of `struct tcp_sock`.
    pub tcp_copied_seq: u32,
}

impl Layout {
    pub fn of_running_kernel() -> Result<Layout> {
        let btf = Btf::from_file("/sys/kernel/btf/vmlinux")
            .context("reading the kernel's BTF (/sys/kernel/btf/vmlinux)")?;
        // TCP_SKB_CB(skb) is skb->cb seen as a struct tcp_skb_cb.
        let skb_seq = offset(&btf, "sk_buff", "cb")? + offset(&btf, "tcp_skb_cb", "seq")?;
        let tcp_copied_seq = offset(&btf, "tcp_sock", "copied_seq")?;
        Ok(Layout {
            skb_seq,
            tcp_copied_seq,
        })
    }
}

/// Byte offset of `field` in `struct name`, looking into anonymous
/// struct and union members (kernels group fields in them).
fn offset(btf: &Btf, name: &str, field: &str) -> Result<u32> {
    let ty = btf
        .resolve_types_by_name(name)
        .with_context(|| format!("struct {name} in the kernel's BTF"))?
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s),
            _ => None,
        })
        .ok_or_else(|| anyhow!("the kernel's BTF has no struct {name}"))?;
    let bits = find(btf, &ty, field)?.ok_or_else(|| anyhow!("struct {name} has no field {field}"))?;
    Ok(bits / 8)
}

fn find(btf: &Btf, s: &Struct, field: &str) -> Result<Option<u32>> {
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        if name == field {
            return Ok(Some(m.bit_offset()));
        }
        if name.is_empty() {
            if let Type::Struct(inner) | Type::Union(inner) = btf.resolve_chained_type(m)? {
                if let Some(bits) = find(btf, &inner, field)? {
                    return Ok(Some(m.bit_offset() + bits));
                }
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `seq` is the first field of tcp_skb_cb and `cb` has sat right after
    /// the list pointers, the socket and the timestamp for years; a
    /// kernel that moved them would still be read right, this only pins
    /// that the reading works on the kernel the tests run on.
    #[test]
    fn reads_this_kernels_layout() {
        let layout = Layout::of_running_kernel().expect("kernel BTF");
        assert_eq!(layout.skb_seq, 40);
        assert!(layout.tcp_copied_seq > 0 && layout.tcp_copied_seq % 4 == 0);
    }
}
