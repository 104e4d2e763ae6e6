//! `cargo xtask deps`: checks the dependency graph against [`RULES`].
//!
//! The graph is `cargo metadata`'s resolve graph with normal and build dependencies
//! (dev-dependencies are excluded: tests and benches may use anything). All rules are
//! transitive: "A must not depend on B" means no chain of dependencies from A reaches B.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// One row of the rules table.
#[derive(Debug)]
pub(crate) enum Rule {
    /// `crates` sit at `layer`: they may only depend on workspace crates of a *lower* layer,
    /// so crates of the same layer are independent of each other.
    Layer {
        layer: u8,
        crates: &'static [&'static str],
        why: &'static str,
    },
    /// None of `crates` may depend on any of `deps`.
    Forbid {
        crates: &'static [&'static str],
        deps: &'static [&'static str],
        why: &'static str,
    },
    /// Of the layered crates, only `allowed` may depend on `dep`.
    OnlyFrom {
        dep: &'static str,
        allowed: &'static [&'static str],
        why: &'static str,
    },
    /// `krate` encapsulates `deps` behind its own API: a crate that reaches one of them *only*
    /// through `krate` (every chain passes through it) does not break a `Forbid` or
    /// `OnlyFrom` rule about it.
    Boundary {
        krate: &'static str,
        deps: &'static [&'static str],
        why: &'static str,
    },
}

/// The rules table: the architecture of kvserve, bottom up.
///
/// Every crate under `crates/` must have a layer here. Crates listed here that are not in
/// the workspace yet are skipped. Other workspace members (xtask, kvserve-tests) are
/// unconstrained.
pub(crate) const RULES: &[Rule] = &[
    Rule::Layer {
        layer: 0,
        crates: &["kv-quant", "kv-block-manager"],
        why: "leaf building blocks (quant formats, paged-block bookkeeping), independent of each other",
    },
    Rule::Layer {
        layer: 1,
        crates: &["kernels-cuda"],
        why: "GPU kernels work on the block and quant layouts only",
    },
    Rule::Layer {
        layer: 2,
        crates: &["model"],
        why: "the model forward pass is built on the kernels",
    },
    Rule::Layer {
        layer: 3,
        crates: &["scheduler", "dist"],
        why: "scheduling policy and multi-GPU communication, independent of each other",
    },
    Rule::Layer {
        layer: 4,
        crates: &["engine"],
        why: "the engine loop ties scheduler, model and dist together",
    },
    Rule::Layer {
        layer: 5,
        crates: &["serve-grpc"],
        why: "the network front end is the top; nothing in the server depends on it",
    },
    Rule::Forbid {
        crates: &["kv-block-manager", "kv-quant", "scheduler"],
        deps: &[
            "cudarc",
            "tokio",
            "futures",
            "async-std",
            "tonic",
            "prost",
            "hyper",
        ],
        why: "block bookkeeping, quant formats and scheduling stay synchronous and CPU-only, \
              testable without a GPU or an async runtime",
    },
    Rule::OnlyFrom {
        dep: "tonic",
        allowed: &["serve-grpc"],
        why: "gRPC is a front-end concern; the engine exposes a plain Rust API",
    },
    Rule::OnlyFrom {
        dep: "prost",
        allowed: &["serve-grpc"],
        why: "protobuf types stay in the front end; the engine exposes a plain Rust API",
    },
    Rule::OnlyFrom {
        dep: "prost-types",
        allowed: &["serve-grpc"],
        why: "protobuf types stay in the front end; the engine exposes a plain Rust API",
    },
    Rule::OnlyFrom {
        dep: "cudarc",
        allowed: &["kernels-cuda", "model", "dist", "engine", "serve-grpc"],
        why: "CUDA is reached through kernels-cuda (and dist for NCCL); the scheduler and the \
              KV bookkeeping stay host-only",
    },
    Rule::Boundary {
        krate: "model",
        deps: &["cudarc", "kernels-cuda"],
        why: "the scheduler runs draft models through model's `Backend` trait, which hides the \
              device; it never touches CUDA itself",
    },
];

/// Where a package of the graph comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A dependency from outside the workspace.
    External,
    /// A workspace member; `under_crates` when its manifest is under `crates/`.
    Member { under_crates: bool },
}

#[derive(Debug)]
struct Package {
    name: String,
    origin: Origin,
    deps: Vec<usize>,
}

/// A dependency graph: packages (keyed by an id) and their dependency edges.
#[derive(Debug, Default)]
pub(crate) struct Graph {
    packages: Vec<Package>,
    by_key: HashMap<String, usize>,
}

impl Graph {
    /// Adds a package (once per `key`) and returns its index.
    pub(crate) fn add(&mut self, key: &str, name: &str, origin: Origin) -> usize {
        if let Some(&i) = self.by_key.get(key) {
            return i;
        }
        let (name, deps) = (name.to_owned(), Vec::new());
        self.packages.push(Package { name, origin, deps });
        self.by_key.insert(key.to_owned(), self.packages.len() - 1);
        self.packages.len() - 1
    }

    /// Adds the edge "`from` depends on `to`".
    pub(crate) fn add_dep(&mut self, from: usize, to: usize) {
        if !self.packages[from].deps.contains(&to) {
            self.packages[from].deps.push(to);
        }
    }

    /// Builds the graph from `cargo metadata --format-version 1` output
    /// (normal and build dependencies only).
    pub(crate) fn from_metadata(meta: &Value) -> Result<Self> {
        let str_at = |v: &Value, field: &str| -> Result<String> {
            let s = v[field]
                .as_str()
                .with_context(|| format!("metadata: no `{field}`"))?;
            Ok(s.to_owned())
        };
        let array_at = |v: &Value, field: &str| -> Result<Vec<Value>> {
            let a = v[field]
                .as_array()
                .with_context(|| format!("metadata: no `{field}`"))?;
            Ok(a.clone())
        };
        let root = str_at(meta, "workspace_root")?;
        let members: HashSet<String> = array_at(meta, "workspace_members")?
            .iter()
            .filter_map(|id| id.as_str().map(str::to_owned))
            .collect();

        let mut graph = Graph::default();
        for package in array_at(meta, "packages")? {
            let id = str_at(&package, "id")?;
            let origin = if members.contains(&id) {
                let manifest = str_at(&package, "manifest_path")?;
                let relative = Path::new(&manifest).strip_prefix(&root);
                let under_crates = relative.is_ok_and(|p| p.starts_with("crates"));
                Origin::Member { under_crates }
            } else {
                Origin::External
            };
            graph.add(&id, &str_at(&package, "name")?, origin);
        }

        let resolve = meta.get("resolve").context("metadata: no resolve graph")?;
        for node in array_at(resolve, "nodes")? {
            let from = graph.index(&str_at(&node, "id")?)?;
            for dep in array_at(&node, "deps")? {
                // `kind` is null for normal dependencies, "build" or "dev" otherwise.
                let kinds = array_at(&dep, "dep_kinds")?;
                if kinds
                    .iter()
                    .any(|k| k["kind"].is_null() || k["kind"] == "build")
                {
                    let to = graph.index(&str_at(&dep, "pkg")?)?;
                    graph.add_dep(from, to);
                }
            }
        }
        Ok(graph)
    }

    fn index(&self, key: &str) -> Result<usize> {
        self.by_key
            .get(key)
            .copied()
            .with_context(|| format!("metadata: unknown package `{key}`"))
    }

    /// The workspace member called `name`.
    fn member(&self, name: &str) -> Option<usize> {
        (0..self.packages.len()).find(|&i| {
            let p = &self.packages[i];
            p.name == name && p.origin != Origin::External
        })
    }

    /// Every package reachable from `start` (excluded), in breadth-first order, each
    /// with the shortest path to it from `start`, as package names.
    fn reachable(&self, start: usize) -> Vec<(usize, Vec<String>)> {
        self.reachable_avoiding(start, None)
    }

    /// As [`reachable`](Self::reachable), never entering package `avoid`.
    fn reachable_avoiding(&self, start: usize, avoid: Option<usize>) -> Vec<(usize, Vec<String>)> {
        let mut parent: HashMap<usize, usize> = HashMap::new();
        let mut queue = VecDeque::from([start]);
        let mut order = Vec::new();
        while let Some(i) = queue.pop_front() {
            for &dep in &self.packages[i].deps {
                if dep != start && Some(dep) != avoid && !parent.contains_key(&dep) {
                    parent.insert(dep, i);
                    queue.push_back(dep);
                    order.push(dep);
                }
            }
        }
        let path_to = |mut i: usize| {
            let mut path = vec![self.packages[i].name.clone()];
            while let Some(&p) = parent.get(&i) {
                path.push(self.packages[p].name.clone());
                i = p;
            }
            path.reverse();
            path
        };
        order.into_iter().map(|i| (i, path_to(i))).collect()
    }
}

/// A broken rule.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Violation {
    /// The crate that breaks the rule.
    pub(crate) krate: String,
    /// The offending dependency.
    pub(crate) dep: String,
    /// What is wrong, in one line.
    pub(crate) what: String,
    /// The chain of package names from `krate` to `dep`.
    pub(crate) path: Vec<String>,
    /// The `why` of the broken rule.
    pub(crate) why: &'static str,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "error: {}", self.what)?;
        writeln!(f, "  path: {}", self.path.join(" -> "))?;
        write!(f, "  why:  {}", self.why)
    }
}

/// The outcome of [`check`].
#[derive(Debug, Default)]
pub(crate) struct Report {
    /// Layered crates present in the workspace, with their layer.
    pub(crate) checked: Vec<(&'static str, u8)>,
    /// Layered crates not in the workspace (yet): skipped.
    pub(crate) skipped: Vec<&'static str>,
    pub(crate) violations: Vec<Violation>,
}

const UNLISTED_WHY: &str = "every crate under crates/ needs a layer in the rules table \
                            (xtask/src/deps.rs), so the architecture stays explicit";

/// Checks `graph` against `rules`. Pure: no cargo, no I/O.
pub(crate) fn check(graph: &Graph, rules: &[Rule]) -> Report {
    let mut layers: BTreeMap<&str, (u8, &'static str)> = BTreeMap::new();
    let mut layered = Vec::new(); // In table order, for stable output.
    for rule in rules {
        if let Rule::Layer { layer, crates, why } = rule {
            for &krate in *crates {
                layers.insert(krate, (*layer, why));
                layered.push((krate, *layer));
            }
        }
    }

    let mut report = Report::default();
    for p in &graph.packages {
        if p.origin == (Origin::Member { under_crates: true }) && !layers.contains_key(&*p.name) {
            report.violations.push(Violation {
                krate: p.name.clone(),
                dep: String::new(),
                what: format!("`{}` is under crates/ but not in the rules table", p.name),
                path: vec![p.name.clone()],
                why: UNLISTED_WHY,
            });
        }
    }

    for (krate, layer) in layered {
        let Some(start) = graph.member(krate) else {
            report.skipped.push(krate);
            continue;
        };
        report.checked.push((krate, layer));
        // Packages reachable only through a boundary crate that encapsulates them.
        let behind_boundary = |dep: &str| {
            rules.iter().any(|r| match r {
                Rule::Boundary {
                    krate: boundary,
                    deps,
                    ..
                } if deps.contains(&dep) && *boundary != krate => {
                    let avoid = graph.member(boundary);
                    avoid.is_some()
                        && !graph
                            .reachable_avoiding(start, avoid)
                            .iter()
                            .any(|(j, _)| graph.packages[*j].name == dep)
                }
                _ => false,
            })
        };
        for (i, path) in graph.reachable(start) {
            let dep = &graph.packages[i];
            let mut violation = |what: String, why: &'static str| {
                let (krate, dep) = (krate.to_owned(), dep.name.clone());
                let path = path.clone();
                report.violations.push(Violation {
                    krate,
                    dep,
                    what,
                    path,
                    why,
                });
            };

            if dep.origin != Origin::External {
                match layers.get(&*dep.name) {
                    Some(&(dep_layer, why)) if dep_layer >= layer => violation(
                        format!(
                            "`{krate}` (layer {layer}) depends on `{}` (layer {dep_layer}); \
                             only lower layers are allowed",
                            dep.name
                        ),
                        why,
                    ),
                    Some(_) => {}
                    None => violation(
                        format!("`{krate}` depends on `{}`, which has no layer", dep.name),
                        UNLISTED_WHY,
                    ),
                }
            }
            for rule in rules {
                match rule {
                    Rule::Forbid { crates, deps, why }
                        if crates.contains(&krate)
                            && deps.contains(&&*dep.name)
                            && !behind_boundary(&dep.name) =>
                    {
                        violation(format!("`{krate}` must not depend on `{}`", dep.name), why);
                    }
                    Rule::OnlyFrom {
                        dep: only,
                        allowed,
                        why,
                    } if *only == dep.name
                        && !allowed.contains(&krate)
                        && !behind_boundary(&dep.name) =>
                    {
                        let allowed = allowed.join(", ");
                        let what =
                            format!("`{krate}` depends on `{only}`, allowed only in: {allowed}");
                        violation(what, why);
                    }
                    _ => {}
                }
            }
        }
    }
    report
}

/// `cargo xtask deps`: checks the workspace's dependency graph against [`RULES`].
pub(crate) fn run() -> Result<()> {
    let meta = crate::metadata(&[])?;
    let report = check(&Graph::from_metadata(&meta)?, RULES);

    let checked: Vec<String> = report
        .checked
        .iter()
        .map(|(c, l)| format!("{c} (layer {l})"))
        .collect();
    println!("deps: checked {}", checked.join(", "));
    if !report.skipped.is_empty() {
        println!(
            "deps: not in the workspace yet, skipped: {}",
            report.skipped.join(", ")
        );
    }
    for violation in &report.violations {
        println!("{violation}");
    }
    for rule in RULES {
        if let Rule::Boundary { krate, deps, why } = rule {
            println!(
                "deps: `{krate}` encapsulates {} (reaching them only through it is allowed): {why}",
                deps.join(", ")
            );
        }
    }
    match report.violations.len() {
        0 => {
            println!("deps: ok ({} rules)", RULES.len());
            Ok(())
        }
        n => bail!("{n} dependency rule violation(s), see above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synthetic graph: `crates` are members under crates/, `others` are other members,
    /// any other name in `edges` is an external package.
    fn graph(crates: &[&str], others: &[&str], edges: &[(&str, &str)]) -> Graph {
        let mut g = Graph::default();
        for c in crates {
            g.add(c, c, Origin::Member { under_crates: true });
        }
        for c in others {
            g.add(
                c,
                c,
                Origin::Member {
                    under_crates: false,
                },
            );
        }
        for (from, to) in edges {
            let from = g.add(from, from, Origin::External);
            let to = g.add(to, to, Origin::External);
            g.add_dep(from, to);
        }
        g
    }

    fn whats(report: &Report) -> Vec<&str> {
        report.violations.iter().map(|v| v.what.as_str()).collect()
    }

    #[test]
    fn todays_workspace_passes_and_future_crates_are_skipped() {
        let g = graph(
            &["kv-block-manager", "kv-quant"],
            &["xtask", "kvserve-tests"],
            &[
                ("kv-block-manager", "xxhash-rust"),
                ("kv-block-manager", "thiserror"),
                ("kv-quant", "thiserror"),
                ("xtask", "clap"),
            ],
        );
        let report = check(&g, RULES);
        assert_eq!(whats(&report), Vec::<&str>::new());
        assert_eq!(report.checked, [("kv-quant", 0), ("kv-block-manager", 0)]);
        assert!(report.skipped.contains(&"engine"));
        assert!(report.skipped.contains(&"kernels-cuda"));
    }

    #[test]
    fn forbidden_transitive_dep_names_crate_dep_path_and_why() {
        let g = graph(
            &["kv-block-manager"],
            &[],
            &[("kv-block-manager", "some-cache"), ("some-cache", "tokio")],
        );
        let report = check(&g, RULES);
        assert_eq!(report.violations.len(), 1);
        let v = &report.violations[0];
        assert_eq!(
            (v.krate.as_str(), v.dep.as_str()),
            ("kv-block-manager", "tokio")
        );
        assert_eq!(v.path, ["kv-block-manager", "some-cache", "tokio"]);
        assert!(v.why.contains("CPU-only"), "{}", v.why);
        let shown = v.to_string();
        assert!(
            shown.contains("kv-block-manager -> some-cache -> tokio"),
            "{shown}"
        );
    }

    #[test]
    fn cuda_only_behind_model_is_allowed_but_not_directly() {
        // The scheduler reaches cudarc through model: allowed (the boundary).
        let g = graph(
            &["scheduler", "model", "kernels-cuda"],
            &[],
            &[
                ("scheduler", "model"),
                ("model", "kernels-cuda"),
                ("kernels-cuda", "cudarc"),
            ],
        );
        assert_eq!(whats(&check(&g, RULES)), Vec::<&str>::new());
        // Directly, or through another crate, it is not.
        let g = graph(
            &["scheduler", "model", "kernels-cuda"],
            &[],
            &[
                ("scheduler", "model"),
                ("model", "kernels-cuda"),
                ("kernels-cuda", "cudarc"),
                ("scheduler", "some-gpu-lib"),
                ("some-gpu-lib", "cudarc"),
            ],
        );
        let report = check(&g, RULES);
        assert_eq!(report.violations.len(), 2, "{:?}", whats(&report));
        assert!(
            report
                .violations
                .iter()
                .all(|v| v.krate == "scheduler" && v.dep == "cudarc")
        );
    }

    #[test]
    fn depending_on_a_higher_layer_is_a_violation() {
        let g = graph(
            &["kernels-cuda", "model", "kv-quant"],
            &[],
            &[
                ("model", "kernels-cuda"),
                ("kernels-cuda", "model"),
                ("model", "kv-quant"),
            ],
        );
        let report = check(&g, RULES);
        // The cycle makes both crates reach themselves through the other; only the
        // upward edge is wrong.
        assert_eq!(
            whats(&report),
            [
                "`kernels-cuda` (layer 1) depends on `model` (layer 2); only lower layers are allowed"
            ]
        );
        assert_eq!(report.violations[0].path, ["kernels-cuda", "model"]);
    }

    #[test]
    fn same_layer_crates_are_independent() {
        let g = graph(
            &["kv-block-manager", "kv-quant"],
            &[],
            &[("kv-block-manager", "kv-quant")],
        );
        let report = check(&g, RULES);
        assert_eq!(report.violations.len(), 1);
        assert_eq!(report.violations[0].path, ["kv-block-manager", "kv-quant"]);
    }

    #[test]
    fn only_from_allows_listed_crates_and_rejects_others() {
        let g = graph(
            &["serve-grpc", "engine", "scheduler"],
            &[],
            &[
                ("serve-grpc", "engine"),
                ("serve-grpc", "tonic"),
                ("engine", "scheduler"),
                ("engine", "prost"),
            ],
        );
        let report = check(&g, RULES);
        assert_eq!(
            whats(&report),
            ["`engine` depends on `prost`, allowed only in: serve-grpc"]
        );
    }

    #[test]
    fn crate_under_crates_missing_from_the_table_is_an_error() {
        let g = graph(&["kv-quant", "tokenizer"], &[], &[]);
        let report = check(&g, RULES);
        assert_eq!(
            whats(&report),
            ["`tokenizer` is under crates/ but not in the rules table"]
        );
    }

    #[test]
    fn other_workspace_members_are_unconstrained() {
        let g = graph(
            &["kv-quant"],
            &["xtask", "kvserve-tests"],
            &[
                ("xtask", "tokio"),
                ("kvserve-tests", "kv-quant"),
                ("kvserve-tests", "tonic"),
            ],
        );
        assert_eq!(whats(&check(&g, RULES)), Vec::<&str>::new());
    }

    #[test]
    fn metadata_keeps_normal_and_build_deps_and_drops_dev_deps() {
        let meta = serde_json::json!({
            "workspace_root": "/ws",
            "workspace_members": ["kvq"],
            "packages": [
                { "id": "kvq", "name": "kv-quant", "manifest_path": "/ws/crates/kv-quant/Cargo.toml" },
                { "id": "tok", "name": "tokio", "manifest_path": "/reg/tokio/Cargo.toml" },
                { "id": "cc", "name": "cc", "manifest_path": "/reg/cc/Cargo.toml" },
                { "id": "cud", "name": "cudarc", "manifest_path": "/reg/cudarc/Cargo.toml" },
            ],
            "resolve": { "nodes": [
                { "id": "kvq", "deps": [
                    { "pkg": "tok", "dep_kinds": [{ "kind": "dev", "target": null }] },
                    { "pkg": "cc", "dep_kinds": [{ "kind": "build", "target": null }] },
                ]},
                { "id": "cc", "deps": [
                    { "pkg": "cud", "dep_kinds": [{ "kind": null, "target": null }] },
                ]},
                { "id": "tok", "deps": [] },
                { "id": "cud", "deps": [] },
            ]},
        });
        let g = Graph::from_metadata(&meta).unwrap();
        let kvq = g.member("kv-quant").unwrap();
        assert_eq!(
            g.packages[kvq].origin,
            Origin::Member { under_crates: true }
        );
        let report = check(&g, RULES);
        // The dev-dependency on tokio is fine; cudarc through a build-dependency is not.
        let paths: Vec<_> = report
            .violations
            .iter()
            .map(|v| v.path.join(" -> "))
            .collect();
        assert_eq!(
            paths,
            ["kv-quant -> cc -> cudarc", "kv-quant -> cc -> cudarc"]
        );
    }

    #[test]
    fn rules_table_is_consistent() {
        let mut seen = HashSet::new();
        for rule in RULES {
            if let Rule::Layer { crates, .. } = rule {
                for c in *crates {
                    assert!(seen.insert(*c), "`{c}` has two layers");
                }
            }
        }
        for rule in RULES {
            let named: &[&str] = match rule {
                Rule::Layer { .. } => &[],
                Rule::Forbid { crates, .. } => crates,
                Rule::OnlyFrom { allowed, .. } => allowed,
                Rule::Boundary { krate, .. } => std::slice::from_ref(krate),
            };
            for c in named {
                assert!(
                    seen.contains(c),
                    "`{c}` is in a rule but has no layer (typo?)"
                );
            }
        }
    }
}
