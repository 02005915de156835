//! The design document stays true to the code: `docs/architecture.md` §6 lists the workspace's
//! crates and the workspace crates each one depends on, and this test compares that list with what
//! `cargo metadata` reports (normal dependencies only; dev-dependencies are free to point anywhere).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

type Graph = BTreeMap<String, Vec<String>>;

/// The dependency graph between the workspace's own crates, from `cargo metadata`.
fn cargo_graph(root: &Path) -> Graph {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--no-deps", "--format-version", "1", "--offline"])
        .current_dir(root)
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    let packages = meta["packages"].as_array().expect("packages");
    let names: Vec<String> = packages.iter().filter_map(|p| p["name"].as_str().map(String::from)).collect();
    packages
        .iter()
        .map(|p| {
            let mut deps: Vec<String> = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter(|d| d["kind"].is_null())
                .filter_map(|d| d["name"].as_str())
                .filter(|d| names.iter().any(|n| n == d))
                .map(short)
                .collect();
            deps.sort();
            deps.dedup();
            (short(p["name"].as_str().expect("name")), deps)
        })
        .collect()
}

/// `ollm-models` → `models`.
fn short(name: &str) -> String {
    name.strip_prefix("ollm-").unwrap_or(name).to_string()
}

/// The arrows block of §6: the first fenced block after the heading, one `crate -> dep dep …` line
/// per crate (`crate ->` alone for a crate with none).
fn documented_graph(doc: &str) -> Graph {
    let section = doc.split("## 6. Crates and their arrows").nth(1).expect("docs/architecture.md has §6");
    let block = section.split("```text").nth(1).and_then(|b| b.split("```").next()).expect("a ```text block in §6");
    block
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (name, deps) = l.split_once("->").unwrap_or_else(|| panic!("line without '->' in §6: {l:?}"));
            let mut deps: Vec<String> = deps.split_whitespace().map(String::from).collect();
            deps.sort();
            (name.trim().to_string(), deps)
        })
        .collect()
}

#[test]
fn architecture_diagram_matches_cargo_metadata() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let doc = std::fs::read_to_string(root.join("docs/architecture.md")).expect("read docs/architecture.md");
    let documented = documented_graph(&doc);
    let actual = cargo_graph(&root);
    let render = |g: &Graph| g.iter().map(|(k, v)| format!("{k} -> {}", v.join(" "))).collect::<Vec<_>>().join("\n");
    assert_eq!(
        render(&documented),
        render(&actual),
        "docs/architecture.md §6 (left) differs from cargo metadata (right); update the document"
    );
    // Every crate also appears in the layer picture below the arrows.
    let section = doc.split("## 6. Crates and their arrows").nth(1).expect("§6");
    let picture = section.split("```text").nth(2).expect("the layer picture, a second ```text block in §6");
    for name in actual.keys() {
        assert!(
            picture.split_whitespace().any(|w| w == name),
            "crate {name} is missing from the layer picture of docs/architecture.md §6"
        );
    }
}
