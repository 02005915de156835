//! Each family spells its tensor names in one file, its `tensors.rs` table, from which loading,
//! the streamed parts, `synth` and the byte counts are derived. This test reads the sources: a
//! name from a family's table written as a string literal anywhere else in `crates/models/src`
//! (other families' tables aside, which may share a name) means the table is being bypassed.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read src dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The string literals of a table that name tensors (`self_attn.q_proj.weight`, `mlp.router.bias`,
/// `linear_attn.A_log` …): dotted identifiers of at least two parts.
fn tensor_literals(table: &str) -> Vec<String> {
    let mut out = Vec::new();
    for piece in table.split('"').skip(1).step_by(2) {
        let parts: Vec<&str> = piece.split('.').collect();
        let looks_like_a_name = parts.len() >= 2
            && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            && !piece.ends_with(".rs")
            && !piece.ends_with(".json");
        if looks_like_a_name {
            out.push(piece.to_string());
        }
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn each_familys_tensor_names_live_in_its_table() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = rust_files(&src);
    let tables: Vec<&PathBuf> = files.iter().filter(|p| p.file_name().is_some_and(|n| n == "tensors.rs")).collect();
    let families = ["llama3", "gpt_oss", "qwen3_next", "gemma3"];
    for family in families {
        let table = src.join(family).join("tensors.rs");
        assert!(tables.contains(&&table), "{family} has no tensors.rs table");
        let names = tensor_literals(&std::fs::read_to_string(&table).expect("read table"));
        assert!(
            names.len() >= 8,
            "{family}: only {} tensor names found in {}: {names:?}",
            names.len(),
            table.display()
        );
        for file in files.iter().filter(|f| !tables.contains(f)) {
            let text = std::fs::read_to_string(file).expect("read source");
            for name in &names {
                assert!(
                    !text.contains(&format!("\"{name}\"")),
                    "{}: spells {family}'s tensor name \"{name}\"; use the constant from {}",
                    file.display(),
                    table.display()
                );
            }
        }
    }
}
