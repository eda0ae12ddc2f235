//! The module graph of the splicer binary must have no cycle (see
//! docs/architecture.md: each layer calls only those below it). Every
//! `crate::`, `super::` and `self::` path in `proxy-user/src`, in `use`
//! items and in expressions alike, is an edge from the module it is
//! written in to the module it names; test modules are left out. syn
//! parses the files, so a path in a comment or a string is no edge.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use anyhow::{bail, Context as _, Result};
use syn::visit::Visit;

type Module = Vec<String>;

/// Checks `src` (a crate's source folder); Ok with a one-line summary.
pub fn check(src: &Path) -> Result<String> {
    let mut files = BTreeMap::new();
    collect(src, src, &mut files)?;
    let modules: BTreeSet<Module> = files.keys().cloned().collect();
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (module, path) in &files {
        let text = fs::read_to_string(path)?;
        let file = syn::parse_file(&text).with_context(|| format!("parsing {}", path.display()))?;
        let mut refs = Refs::default();
        refs.visit_file(&file);
        for r in refs.paths {
            if let Some(target) = resolve(module, &r, &modules) {
                if &target != module {
                    edges.entry(module.clone()).or_default().insert(target);
                }
            }
        }
    }
    let count: usize = edges.values().map(BTreeSet::len).sum();
    if let Some(cycle) = find_cycle(&modules, &edges) {
        let names: Vec<String> = cycle.iter().map(name).collect();
        bail!("module cycle in {}: {}", src.display(), names.join(" -> "));
    }
    Ok(format!("{} modules, {count} edges between them, no cycle", modules.len()))
}

/// Module path of every .rs file under `dir` (`a/mod.rs` and `a.rs` are `a`).
fn collect(root: &Path, dir: &Path, out: &mut BTreeMap<Module, std::path::PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(root)?.with_extension("");
            let mut m: Module = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
            if matches!(m.last().map(String::as_str), Some("mod" | "main" | "lib")) {
                m.pop();
            }
            out.insert(m, path);
        }
    }
    Ok(())
}

/// A path's target module: the longest module prefix of it.
fn resolve(from: &Module, path: &[String], modules: &BTreeSet<Module>) -> Option<Module> {
    let (mut base, mut rest) = match path.first().map(String::as_str) {
        Some("crate") => (Vec::new(), &path[1..]),
        Some("self") => (from.clone(), &path[1..]),
        Some("super") => (from.clone(), path),
        _ => return None,
    };
    while rest.first().is_some_and(|s| s == "super") {
        base.pop();
        rest = &rest[1..];
    }
    let mut full = base;
    full.extend(rest.iter().cloned());
    while !full.is_empty() && !modules.contains(&full) {
        full.pop();
    }
    (!full.is_empty()).then_some(full)
}

fn name(m: &Module) -> String {
    m.join("::")
}

/// A cycle, if any, by depth-first search.
fn find_cycle(modules: &BTreeSet<Module>, edges: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    fn visit<'a>(
        m: &'a Module,
        edges: &'a BTreeMap<Module, BTreeSet<Module>>,
        done: &mut BTreeSet<&'a Module>,
        path: &mut Vec<&'a Module>,
    ) -> Option<Vec<Module>> {
        if let Some(i) = path.iter().position(|p| *p == m) {
            let mut cycle: Vec<Module> = path[i..].iter().map(|p| (*p).clone()).collect();
            cycle.push(m.clone());
            return Some(cycle);
        }
        if !done.insert(m) {
            return None;
        }
        path.push(m);
        for next in edges.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, edges, done, path) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    modules.iter().find_map(|m| visit(m, edges, &mut done, &mut Vec::new()))
}

/// Every `crate::`/`super::`/`self::` path, with `use` trees flattened.
#[derive(Default)]
struct Refs {
    paths: Vec<Vec<String>>,
}

impl<'ast> Visit<'ast> for Refs {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        let is_test = m.attrs.iter().any(|a| {
            a.path().is_ident("cfg") && a.parse_args::<syn::Ident>().is_ok_and(|i| i == "test")
        });
        if !is_test {
            syn::visit::visit_item_mod(self, m);
        }
    }

    /// `pub(super)` and `pub(in path)` say who may see an item, not what
    /// it uses.
    fn visit_vis_restricted(&mut self, _: &'ast syn::VisRestricted) {}

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        flatten(&u.tree, &mut Vec::new(), &mut self.paths);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        if segs.first().is_some_and(|s| s == "crate" || s == "super" || s == "self") {
            self.paths.push(segs);
        }
        syn::visit::visit_path(self, p);
    }
}

fn flatten(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            flatten(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => out.push([prefix.as_slice(), &[n.ident.to_string()]].concat()),
        syn::UseTree::Rename(r) => out.push([prefix.as_slice(), &[r.ident.to_string()]].concat()),
        syn::UseTree::Glob(_) => out.push(prefix.clone()),
        syn::UseTree::Group(g) => g.items.iter().for_each(|t| flatten(t, prefix, out)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(files: &[(&str, &str)]) -> Result<String> {
        // One folder per call: the tests run in parallel.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("layers-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (path, text) in files {
            let p = dir.join(path);
            fs::create_dir_all(p.parent().unwrap())?;
            fs::write(p, text)?;
        }
        let r = check(&dir);
        fs::remove_dir_all(&dir)?;
        r
    }

    #[test]
    fn a_call_by_full_path_is_an_edge_and_closes_a_cycle() {
        let e = graph(&[
            ("main.rs", "mod a; mod b; fn main() {}"),
            ("a.rs", "use crate::b::B; pub struct A;"),
            ("b.rs", "pub struct B; fn f() { crate::a::A; } // crate::nothing\n"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("a -> b -> a") || e.to_string().contains("b -> a -> b"), "{e}");
    }

    #[test]
    fn children_may_use_siblings_and_tests_do_not_count() {
        let ok = graph(&[
            ("main.rs", "mod d; fn main() {}"),
            ("d/mod.rs", "mod k; mod r; mod v; pub use self::k::K; pub use self::v::Seen;"),
            ("d/k.rs", "use super::r::R; pub struct K;"),
            ("d/r.rs", "pub struct R; #[cfg(test)] mod tests { use crate::d::K; }"),
            // Visibility paths name who may see, not what is used.
            ("d/v/mod.rs", "pub(super) mod deep; pub(in crate::d) struct Seen;"),
            ("d/v/deep.rs", ""),
        ])
        .unwrap();
        assert!(ok.contains("no cycle"), "{ok}");
        let e = graph(&[
            ("main.rs", "mod d; fn main() {}"),
            ("d/mod.rs", "mod k; pub struct Shared; pub use self::k::K;"),
            ("d/k.rs", "use super::Shared; pub struct K;"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("module cycle"), "{e}");
    }
}
