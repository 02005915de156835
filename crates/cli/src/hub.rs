//! Models from the Hugging Face hub: `ollm pull ORG/NAME` and `--model ORG/NAME`.
//!
//! Files come through hf-hub's own cache (resumable `.part` downloads, progress bars) and are
//! linked or copied into a staging directory that is renamed to `<cache>/models/ORG--NAME` once
//! complete, so an interrupted pull never leaves a directory that looks finished.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};

use crate::demo::cache_root;

/// Files a model directory needs (besides the weights).
const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
const OPTIONAL: [&str; 5] = [
    "generation_config.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
];
const SINGLE_WEIGHTS: &str = "model.safetensors";
const SHARD_INDEX: &str = "model.safetensors.index.json";

/// True for `ORG/NAME` that is not a path on disk.
pub fn is_hub_id(spec: &str) -> bool {
    let ok = |s: &str| {
        !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && s != "." && s != ".."
    };
    match spec.split_once('/') {
        Some((org, name)) => ok(org) && ok(name) && !Path::new(spec).exists(),
        None => false,
    }
}

/// `<cache>/models/ORG--NAME` (with `@REVISION` for a revision other than main).
pub fn model_dir_for(repo_id: &str, revision: Option<&str>) -> anyhow::Result<PathBuf> {
    let mut name = repo_id.replace('/', "--");
    if let Some(rev) = revision.filter(|r| *r != "main") {
        name.push('@');
        name.push_str(&rev.replace('/', "--"));
    }
    Ok(cache_root()?.join("models").join(name))
}

fn is_complete(dir: &Path) -> bool {
    REQUIRED.iter().all(|f| dir.join(f).exists())
        && (dir.join(SINGLE_WEIGHTS).exists() || dir.join(SHARD_INDEX).exists())
}

/// The model's directory, pulled on first use.
pub fn ensure_model(repo_id: &str, revision: Option<&str>) -> anyhow::Result<PathBuf> {
    let dir = model_dir_for(repo_id, revision)?;
    if is_complete(&dir) {
        return Ok(dir);
    }
    crate::progress::note(&format!("[ollm] first use of {repo_id}: downloading it from the Hugging Face hub"));
    pull(repo_id, revision)
}

/// Downloads a safetensors model into the cache and returns its directory.
pub fn pull(repo_id: &str, revision: Option<&str>) -> anyhow::Result<PathBuf> {
    if !is_hub_id(repo_id) {
        bail!("'{repo_id}' is not a hub id: give ORG/NAME, e.g. HuggingFaceTB/SmolLM2-135M-Instruct");
    }
    let dir = model_dir_for(repo_id, revision)?;
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    let api = ApiBuilder::from_env().with_progress(true).build().context("setting up the Hugging Face hub client")?;
    let rev = revision.unwrap_or("main").to_string();
    let repo = api.repo(Repo::with_revision(repo_id.to_string(), RepoType::Model, rev.clone()));
    let info = repo.info().map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the Hugging Face hub at {endpoint} for {repo_id} (revision {rev}): {e}; check the network, HF_ENDPOINT and HF_TOKEN, or pass a local model directory to --model"
        )
    })?;
    let listed: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let has = |f: &str| listed.contains(&f);
    for f in REQUIRED {
        if !has(f) {
            bail!(
                "{repo_id} has no {f}: ollm needs a Hugging Face transformers model with {} and safetensors weights",
                REQUIRED.join(", ")
            );
        }
    }
    let mut files: Vec<String> =
        REQUIRED.iter().chain(OPTIONAL.iter()).filter(|f| has(f)).map(|f| f.to_string()).collect();
    let staging_root = dir.parent().context("the model directory has no parent")?;
    std::fs::create_dir_all(staging_root)
        .with_context(|| format!("cannot create {} (set OLLM_HOME to a writable directory)", staging_root.display()))?;
    let staging = staging_root.join(format!(
        ".{}.partial-{}",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("model"),
        std::process::id()
    ));
    std::fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    let result = (|| -> anyhow::Result<()> {
        if has(SINGLE_WEIGHTS) {
            files.push(SINGLE_WEIGHTS.into());
        } else if has(SHARD_INDEX) {
            let index = repo.get(SHARD_INDEX).with_context(|| format!("downloading {SHARD_INDEX} of {repo_id}"))?;
            files.push(SHARD_INDEX.into());
            files.extend(shards(&index)?);
        } else {
            bail!(
                "{repo_id} has no {SINGLE_WEIGHTS} or {SHARD_INDEX}: ollm loads safetensors weights only (for a GGUF use `ollm import-gguf`)"
            );
        }
        for f in &files {
            let cached = repo.get(f).with_context(|| format!("downloading {f} of {repo_id}"))?;
            place(&cached, &staging.join(f))?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot replace the incomplete {}", dir.display()))?;
    }
    std::fs::rename(&staging, &dir)
        .with_context(|| format!("cannot move {} to {}", staging.display(), dir.display()))?;
    Ok(dir)
}

/// The shard file names listed in a `model.safetensors.index.json`.
fn shards(index: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(index).with_context(|| format!("cannot read {}", index.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{} has no weight_map", index.display()))?;
    let mut names: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Hard-links a cached file into place (no second copy on disk), or copies it.
fn place(cached: &Path, dest: &Path) -> anyhow::Result<()> {
    let real = std::fs::canonicalize(cached).unwrap_or_else(|_| cached.to_path_buf());
    if std::fs::hard_link(&real, dest).is_ok() {
        return Ok(());
    }
    std::fs::copy(&real, dest).with_context(|| format!("cannot copy {} to {}", real.display(), dest.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_org_slash_name() {
        assert!(is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!is_hub_id("smollm2-135m"));
        assert!(!is_hub_id("a/b/c"));
        assert!(!is_hub_id("/abs"));
        assert!(!is_hub_id("org/"));
        assert!(!is_hub_id("../x"));
    }
}
