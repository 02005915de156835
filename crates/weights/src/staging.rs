//! Writing a model directory atomically: everything goes into a hidden staging directory beside
//! the output, renamed into place at the end, so an interrupted import or synthesis never leaves
//! a directory that looks complete.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Result, WeightsError};

fn format_err(path: &Path, detail: impl Into<String>) -> WeightsError {
    WeightsError::Format { path: path.to_path_buf(), detail: detail.into() }
}

/// Writes `value` as pretty JSON with a trailing newline.
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| format_err(path, format!("does not serialise: {e}")))?;
    std::fs::write(path, text + "\n").map_err(|source| WeightsError::Write { path: path.to_path_buf(), source })
}

/// `out_dir` must not exist, or be an empty directory.
pub fn check_out_dir(out_dir: &Path) -> Result<()> {
    if !out_dir.exists() {
        return Ok(());
    }
    let empty = std::fs::read_dir(out_dir).map(|mut d| d.next().is_none()).unwrap_or(false);
    if !out_dir.is_dir() || !empty {
        return Err(format_err(
            out_dir,
            "already exists and is not an empty directory; remove it or choose another output directory",
        ));
    }
    Ok(())
}

/// The staging directory `.<out name>.<tag>-<pid>.tmp` beside the output. Removed on drop
/// unless committed.
#[derive(Debug)]
pub struct Staging {
    path: PathBuf,
    committed: bool,
}

impl Staging {
    /// Creates the staging directory for `out_dir`; `tag` names the writer ("import", "synth").
    pub fn create(out_dir: &Path, tag: &str) -> Result<Self> {
        let name = out_dir.file_name().ok_or_else(|| format_err(out_dir, "has no directory name to write into"))?;
        let parent = out_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let path = parent.join(format!(".{}.{tag}-{}.tmp", name.to_string_lossy(), std::process::id()));
        if path.exists() {
            // Left by an earlier run that died with our pid: ours to remove.
            std::fs::remove_dir_all(&path).map_err(|source| WeightsError::Write { path: path.clone(), source })?;
        }
        std::fs::create_dir_all(&path).map_err(|source| WeightsError::Write { path: path.clone(), source })?;
        Ok(Self { path, committed: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the staging directory to `out_dir` (replacing it if it is an empty directory).
    pub fn commit(mut self, out_dir: &Path) -> Result<()> {
        check_out_dir(out_dir)?;
        if out_dir.exists() {
            std::fs::remove_dir(out_dir)
                .map_err(|source| WeightsError::Write { path: out_dir.to_path_buf(), source })?;
        }
        std::fs::rename(&self.path, out_dir)
            .map_err(|source| WeightsError::Write { path: out_dir.to_path_buf(), source })?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: a failed cleanup leaves only a hidden .tmp directory behind.
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
