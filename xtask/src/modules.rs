//! The module graph of a crate's sources: which module names which (`crate::…`, `super::…`
//! paths in `use` lines and in code, test modules left out), its circles, and the arrows that
//! run from a lower layer to a higher one. `cargo run -p tollgate-xtask -- modules` prints it;
//! the tests below hold the sidecar and the filter to the layers ARCHITECTURE.md names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use petgraph::graph::DiGraph;
use syn::visit::Visit;

/// The sidecar's layers, lowest first: a module names only modules of lower layers (and its
/// own descendants and siblings inside the same top-level module, without circles).
pub const SIDECAR_LAYERS: &[&[&str]] = &[
    &["core"],
    &["clock", "auth", "jwt"],
    &["store", "session", "trial"],
    &["engine"],
    &["usage"],
    &["alerts"],
    &["config"],
    &["net"],
    &["metrics"],
    &["catalog"],
    &["service"],
    &["grpc", "api"],
    &["portal"],
    &["http"],
    &["server"],
];

/// The filter's layers, lowest first.
pub const FILTER_LAYERS: &[&[&str]] = &[
    &["api", "lines", "pbjson", "bounded"],
    &["config", "endpoint"],
    &["stream"],
    &["extract", "settle", "batch"],
    &["decision", "close_queue", "report_queue"],
    &["host"],
];

/// Which module names which, by module path (`store::redis`); the crate root is `""`.
#[derive(Debug, Default)]
pub struct ModuleGraph {
    pub edges: BTreeMap<String, BTreeSet<String>>,
}

/// What is wrong with a graph.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Findings {
    /// Each circle's modules, sorted.
    pub circles: Vec<Vec<String>>,
    /// `from -> to` arrows from a lower layer to a higher one (or between modules of one layer).
    pub upward: Vec<String>,
    /// Top-level modules no layer names.
    pub unlayered: Vec<String>,
}

impl Findings {
    pub fn is_clean(&self) -> bool {
        self.circles.is_empty() && self.upward.is_empty() && self.unlayered.is_empty()
    }
}

impl std::fmt::Display for Findings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in &self.circles {
            writeln!(f, "circle: {}", c.join(" <-> "))?;
        }
        for u in &self.upward {
            writeln!(f, "arrow against the layers: {u}")?;
        }
        for m in &self.unlayered {
            writeln!(f, "module in no layer: {m}")?;
        }
        Ok(())
    }
}

/// The module path of `file` under `src`: `store/redis/mod.rs` is `store::redis`.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?.with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    Some(parts.join("::"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.parse_args::<syn::Meta>()
                .is_ok_and(|m| m.path().is_ident("test"))
    })
}

/// Collects every path a file names, as segments, leaving out `#[cfg(test)]` items.
#[derive(Default)]
struct Paths(Vec<Vec<String>>);

impl Paths {
    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                let mut full = prefix.clone();
                full.push(n.ident.to_string());
                self.0.push(full);
            }
            syn::UseTree::Rename(r) => {
                let mut full = prefix.clone();
                full.push(r.ident.to_string());
                self.0.push(full);
            }
            syn::UseTree::Glob(_) => self.0.push(prefix.clone()),
            syn::UseTree::Group(g) => g.items.iter().for_each(|t| self.use_tree(prefix, t)),
        }
    }
}

impl<'ast> Visit<'ast> for Paths {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs = match item {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Impl(i) => &i.attrs,
            syn::Item::Use(u) => &u.attrs,
            _ => return syn::visit::visit_item(self, item),
        };
        if !is_cfg_test(attrs) {
            syn::visit::visit_item(self, item);
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &u.tree);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        self.0
            .push(p.segments.iter().map(|s| s.ident.to_string()).collect());
        syn::visit::visit_path(self, p);
    }
}

impl ModuleGraph {
    /// The graph of the crate whose sources are under `src`.
    pub fn of(src: &Path) -> anyhow::Result<Self> {
        let mut files = Vec::new();
        rust_files(src, &mut files)?;
        let modules: BTreeMap<String, PathBuf> = files
            .iter()
            .filter_map(|f| module_of(src, f).map(|m| (m, f.clone())))
            .collect();
        let mut graph = Self::default();
        for (module, file) in &modules {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            let ast =
                syn::parse_file(&text).with_context(|| format!("parsing {}", file.display()))?;
            let mut paths = Paths::default();
            paths.visit_file(&ast);
            let here: Vec<&str> = module.split("::").filter(|s| !s.is_empty()).collect();
            for path in paths.0 {
                let absolute: Vec<String> = match path.first().map(String::as_str) {
                    Some("crate") => path[1..].to_vec(),
                    Some("super") => {
                        let ups = path.iter().take_while(|s| *s == "super").count();
                        let base = here.len().saturating_sub(ups);
                        here[..base]
                            .iter()
                            .map(|s| s.to_string())
                            .chain(path[ups..].iter().cloned())
                            .collect()
                    }
                    _ => continue,
                };
                // The longest prefix that is a module.
                let target = (1..=absolute.len())
                    .rev()
                    .map(|n| absolute[..n].join("::"))
                    .find(|m| modules.contains_key(m));
                if let Some(t) = target {
                    let related = t == *module
                        || module.starts_with(&format!("{t}::"))
                        || t.starts_with(&format!("{module}::"))
                        || module.is_empty();
                    if !related {
                        graph.edges.entry(module.clone()).or_default().insert(t);
                    }
                }
            }
        }
        Ok(graph)
    }

    /// The circles, and the arrows against `layers` between top-level modules.
    pub fn check(&self, layers: &[&[&str]]) -> Findings {
        let mut g = DiGraph::<&str, ()>::new();
        let mut index = BTreeMap::new();
        for (from, tos) in &self.edges {
            for m in std::iter::once(from).chain(tos) {
                index
                    .entry(m.as_str())
                    .or_insert_with(|| g.add_node(m.as_str()));
            }
        }
        for (from, tos) in &self.edges {
            for to in tos {
                g.add_edge(index[from.as_str()], index[to.as_str()], ());
            }
        }
        let mut findings = Findings::default();
        for scc in petgraph::algo::tarjan_scc(&g) {
            if scc.len() > 1 {
                let mut names: Vec<String> = scc.iter().map(|n| g[*n].to_string()).collect();
                names.sort();
                findings.circles.push(names);
            }
        }
        findings.circles.sort();
        let layer_of = |m: &str| {
            let top = m.split("::").next().unwrap_or(m);
            layers.iter().position(|l| l.contains(&top))
        };
        let mut unlayered = BTreeSet::new();
        for (from, tos) in &self.edges {
            for to in tos {
                let (a, b) = (
                    from.split("::").next().unwrap_or(from),
                    to.split("::").next().unwrap_or(to),
                );
                if a == b {
                    continue;
                }
                match (layer_of(a), layer_of(b)) {
                    (Some(la), Some(lb)) if la > lb => {}
                    (Some(_), Some(_)) => findings.upward.push(format!("{from} -> {to}")),
                    (la, lb) => {
                        if la.is_none() {
                            unlayered.insert(a.to_string());
                        }
                        if lb.is_none() {
                            unlayered.insert(b.to_string());
                        }
                    }
                }
            }
        }
        findings.unlayered = unlayered.into_iter().collect();
        findings
    }

    /// `from -> to` lines, for reading.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (from, tos) in &self.edges {
            let shown: Vec<&str> = tos.iter().map(String::as_str).collect();
            out.push_str(&format!("{from} -> {}\n", shown.join(", ")));
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf()
    }

    #[test]
    fn the_sidecar_has_no_circles_and_no_arrow_against_its_layers() {
        let g = ModuleGraph::of(&root().join("decision-server/src")).unwrap();
        assert!(g.edges.len() > 20, "too few modules read:\n{}", g.render());
        let f = g.check(SIDECAR_LAYERS);
        assert!(f.is_clean(), "{f}");
    }

    #[test]
    fn the_filter_has_no_circles_and_no_arrow_against_its_layers() {
        let g = ModuleGraph::of(&root().join("filter/src")).unwrap();
        let f = g.check(FILTER_LAYERS);
        assert!(f.is_clean(), "{f}");
    }

    #[test]
    fn circles_and_upward_arrows_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path();
        std::fs::create_dir_all(src.join("low")).unwrap();
        std::fs::write(src.join("lib.rs"), "pub mod low; pub mod high;").unwrap();
        std::fs::write(
            src.join("low/mod.rs"),
            "pub mod a; pub mod b; pub fn f() { crate::high::g() }",
        )
        .unwrap();
        std::fs::write(src.join("low/a.rs"), "use super::b::X; pub struct Y;").unwrap();
        std::fs::write(
            src.join("low/b.rs"),
            "pub struct X(super::a::Y);\n#[cfg(test)]\nmod tests { use crate::high::Z; }",
        )
        .unwrap();
        std::fs::write(
            src.join("high.rs"),
            "use crate::low::{a::Y, f}; pub fn g() {}",
        )
        .unwrap();
        let g = ModuleGraph::of(src).unwrap();
        let f = g.check(&[&["low"], &["high"]]);
        assert_eq!(
            f.circles,
            [
                vec!["high".to_string(), "low".to_string()],
                vec!["low::a".to_string(), "low::b".to_string()]
            ]
        );
        assert_eq!(f.upward, ["low -> high"]);
        assert!(f.unlayered.is_empty());
        let f = g.check(&[&["low"]]);
        assert_eq!(f.unlayered, ["high"]);
    }
}
