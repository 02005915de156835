//! The tier bandwidths the planner predicts with: device memory, pinned host-to-device copies
//! and O_DIRECT disk reads, measured once per backend and disk and kept in a JSON cache file.

use std::path::Path;

use ollm_ops::Backend;
use serde_json::{Value, json};

use crate::plan::Bandwidths;
use crate::{ResidencyError, Result};

/// Measured tier bandwidths for `backend` and the disk holding `weights`, from `cache` (a JSON
/// file keyed by backend and disk) when it has them and `fresh` is false, else measured now and
/// stored there. Returns whether the figures came from the cache. A cache that cannot be read or
/// written only costs a re-measurement.
pub fn calibrate(
    backend: &dyn Backend,
    weights: &Path,
    cache: Option<&Path>,
    fresh: bool,
) -> Result<(Bandwidths, bool)> {
    let key = format!("{} | disk {}", backend.name(), disk_key(weights));
    let mut all: Value = cache
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| json!({}));
    if !fresh
        && let Some(e) = all.get(&key)
        && let (Some(d), Some(h), Some(k)) = (e["device"].as_f64(), e["host_to_device"].as_f64(), e["disk"].as_f64())
    {
        return Ok((Bandwidths { device: d, host_to_device: h, disk: k }, true));
    }
    eprintln!("[ollm] calibrating: device memory, host→device copies, O_DIRECT disk reads (a few seconds)");
    let device = crate::measure::memory_bandwidth(backend, 1 << 30)?;
    let host_to_device = crate::measure::host_to_device_bandwidth(backend, 1 << 30)?;
    let (disk, direct) = ollm_io::direct::measure_read_bandwidth(weights, 2 << 30, ollm_io::direct::READERS)
        .map_err(|source| ResidencyError::DiskMeasure { path: weights.to_path_buf(), source })?;
    if !direct {
        eprintln!("[ollm] note: {} refuses O_DIRECT; the disk figure includes the page cache", weights.display());
    }
    let bw = Bandwidths { device, host_to_device, disk };
    if !all.is_object() {
        all = json!({});
    }
    all[key] = json!({"device": device, "host_to_device": host_to_device, "disk": disk, "o_direct": direct});
    if let Some(p) = cache {
        if let Some(parent) = p.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::fs::write(p, serde_json::to_string_pretty(&all).unwrap_or_default());
    }
    Ok((bw, false))
}

#[cfg(unix)]
fn disk_key(p: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    p.metadata().map_or_else(|_| "unknown".into(), |m| format!("dev {}", m.dev()))
}

#[cfg(not(unix))]
fn disk_key(p: &Path) -> String {
    p.parent().map_or_else(|| "unknown".into(), |d| d.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_figures_are_read_back_by_backend_and_disk() {
        let dir = tempfile::tempdir().expect("temp dir");
        let weights = dir.path().join("w.safetensors");
        std::fs::write(&weights, vec![7u8; 1 << 16]).expect("write weights");
        let cache = dir.path().join("cache").join("calibration.json");
        let be = ollm_ops::cpu::CpuBackend::new();
        let key = format!("{} | disk {}", be.name(), disk_key(&weights));
        let cached = json!({ key.clone(): {"device": 1.0, "host_to_device": 2.0, "disk": 3.0} });
        std::fs::create_dir_all(dir.path().join("cache")).expect("cache dir");
        std::fs::write(&cache, cached.to_string()).expect("write cache");
        let (bw, hit) = calibrate(&be, &weights, Some(&cache), false).expect("cached");
        assert!(hit);
        assert_eq!(bw, Bandwidths { device: 1.0, host_to_device: 2.0, disk: 3.0 });
    }
}
