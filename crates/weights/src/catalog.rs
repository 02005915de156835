//! The catalog of a checkpoint: tensor name → (file, byte range, dtype, shape).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ollm_io::ReadFile;
use ollm_ops::{DType, HostTensor};

use crate::format::safetensors::read_header;
use crate::{Result, WeightsError};

/// Where one tensor's bytes are.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Index into the catalog's files.
    pub file: usize,
    pub offset_bytes: u64,
    pub len_bytes: u64,
}

/// Owns the open checkpoint files and the index of their tensors. Reads are positioned, so one
/// catalog can serve several threads.
#[derive(Debug)]
pub struct Catalog {
    files: Vec<ReadFile>,
    entries: BTreeMap<String, TensorEntry>,
}

impl Catalog {
    /// Opens `model.safetensors`, or the shards listed by `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            Self::open_index(&index)
        } else if single.exists() {
            Self::open_files(&[single])
        } else {
            Err(WeightsError::NoWeights { dir: dir.to_path_buf() })
        }
    }

    /// Opens a sharded checkpoint from its index (`{"weight_map": {tensor: file}}`).
    pub fn open_index(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index)
            .map_err(|e| WeightsError::Index { path: index.to_path_buf(), detail: format!("cannot read: {e}") })?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| WeightsError::Index {
            path: index.to_path_buf(),
            detail: format!("not valid JSON: {e} (re-download the index file)"),
        })?;
        let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| WeightsError::Index {
            path: index.to_path_buf(),
            detail: "field 'weight_map' is missing or not an object".into(),
        })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards = BTreeSet::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| WeightsError::Index {
                path: index.to_path_buf(),
                detail: format!("weight_map['{name}'] is not a file name"),
            })?;
            // Shards sit next to the index: a path elsewhere ("../..", "/etc") is not followed.
            let plain = Path::new(file).file_name().is_some_and(|f| f == std::ffi::OsStr::new(file));
            if !plain || file.contains(['/', '\\']) || file.chars().any(char::is_control) {
                return Err(WeightsError::Index {
                    path: index.to_path_buf(),
                    detail: format!(
                        "weight_map['{name}'] is '{file}', not the name of a file next to the index (re-download the index file)"
                    ),
                });
            }
            shards.insert(file.to_string());
        }
        let paths: Vec<PathBuf> = shards.iter().map(|f| dir.join(f)).collect();
        let catalog = Self::open_files(&paths)?;
        for (name, file) in map {
            let listed = dir.join(file.as_str().unwrap_or_default());
            let found = catalog.entries.get(name).map(|e| catalog.files[e.file].path());
            if found != Some(listed.as_path()) {
                return Err(WeightsError::Missing { name: name.clone(), location: listed.display().to_string() });
            }
        }
        Ok(catalog)
    }

    /// Opens one or more safetensors files as one checkpoint. A name in two files is an error.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = BTreeMap::new();
        for (idx, path) in paths.iter().enumerate() {
            let file = ReadFile::open(path)?;
            for h in read_header(&file)? {
                let entry = TensorEntry {
                    name: h.name.clone(),
                    dtype: h.dtype,
                    shape: h.shape,
                    file: idx,
                    offset_bytes: h.offset_bytes,
                    len_bytes: h.len_bytes,
                };
                if entries.insert(h.name.clone(), entry).is_some() {
                    return Err(WeightsError::Index {
                        path: path.clone(),
                        detail: format!("tensor '{}' appears in more than one shard", h.name),
                    });
                }
            }
            files.push(file);
        }
        Ok(Self { files, entries })
    }

    /// Forgets every tensor for which `keep` is false (a checkpoint's tensors the model does not
    /// use: multi-token-prediction heads, vision towers), so nothing after counts, reads or
    /// fingerprints them. Returns their names.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let dropped: Vec<String> = self.entries.keys().filter(|n| !keep(n)).cloned().collect();
        for name in &dropped {
            self.entries.remove(name);
        }
        dropped
    }

    /// Gives tensors the names a model reads: a name that starts with the first prefix of a
    /// pair takes the second instead (the first pair that matches; other names are kept). A
    /// multimodal checkpoint keeps its language model under `language_model.model.` (or
    /// `model.language_model.`); its text model reads `model.`. Two tensors that would take one
    /// name are an error (the catalog is then left empty). Returns how many were renamed.
    pub fn rename_prefixes(&mut self, pairs: &[(&str, &str)]) -> Result<usize> {
        let mut renamed = 0;
        let mut out = BTreeMap::new();
        // New name -> the checkpoint's name, for the message on a clash.
        let mut origin: BTreeMap<String, String> = BTreeMap::new();
        for (name, mut entry) in std::mem::take(&mut self.entries) {
            if let Some(new) =
                pairs.iter().find_map(|(from, to)| name.strip_prefix(from).map(|rest| format!("{to}{rest}")))
            {
                entry.name = new;
                renamed += 1;
            }
            if let Some(first) = origin.insert(entry.name.clone(), name.clone()) {
                return Err(WeightsError::Index {
                    path: self.files[entry.file].path().to_path_buf(),
                    detail: format!(
                        "tensors '{first}' and '{name}' are both the model's '{}' (two spellings of one tensor; keep one)",
                        entry.name
                    ),
                });
            }
            out.insert(entry.name.clone(), entry);
        }
        self.entries = out;
        Ok(renamed)
    }

    /// All tensors, by name.
    pub fn entries(&self) -> impl Iterator<Item = &TensorEntry> {
        self.entries.values()
    }

    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.entries.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The checkpoint's files; [`TensorEntry::file`] indexes this list.
    pub fn file_paths(&self) -> Vec<std::path::PathBuf> {
        self.files.iter().map(|f| f.path().to_path_buf()).collect()
    }

    /// The file a tensor lives in.
    pub fn path_of(&self, entry: &TensorEntry) -> &Path {
        self.files[entry.file].path()
    }

    /// The entry for `name`, checked against the shape the config implies.
    pub fn require(&self, name: &str, want: &[usize]) -> Result<&TensorEntry> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| WeightsError::Missing { name: name.to_string(), location: self.location() })?;
        if entry.shape != want {
            return Err(WeightsError::Shape {
                path: self.path_of(entry).to_path_buf(),
                name: name.to_string(),
                got: entry.shape.clone(),
                want: want.to_vec(),
            });
        }
        Ok(entry)
    }

    /// Reads one tensor's bytes.
    pub fn read(&self, entry: &TensorEntry) -> Result<HostTensor> {
        let bytes = self.files[entry.file].read_vec_at(entry.offset_bytes, entry.len_bytes as usize)?;
        Ok(HostTensor { dtype: entry.dtype, shape: entry.shape.clone(), bytes })
    }

    /// A 128-bit fingerprint of the weights: every tensor's name, dtype, shape and length, and
    /// the first and last 4 KiB of its bytes (a fine-tune changes every tensor; reading it all
    /// would cost a pass over the checkpoint), after `config` (the model's configuration, which
    /// changes the numbers too). The prefix cache keys entries by it.
    pub fn fingerprint(&self, config: &[u8]) -> Result<u128> {
        const SAMPLE: u64 = 4096;
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(config);
        for e in self.entries.values() {
            h.update(e.name.as_bytes());
            h.update(format!("{:?}{:?}{}", e.dtype, e.shape, e.len_bytes).as_bytes());
            let file = &self.files[e.file];
            let head = e.len_bytes.min(SAMPLE);
            h.update(&file.read_vec_at(e.offset_bytes, head as usize)?);
            if e.len_bytes > SAMPLE {
                let tail = (e.len_bytes - SAMPLE).max(head);
                h.update(&file.read_vec_at(e.offset_bytes + tail, (e.len_bytes - tail) as usize)?);
            }
        }
        Ok(h.digest128())
    }

    /// Sum of all tensor sizes in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.entries.values().map(|e| e.len_bytes).sum()
    }

    /// The checkpoint's files, for messages.
    pub fn location(&self) -> String {
        let names: Vec<String> = self.files.iter().map(|f| f.path().display().to_string()).collect();
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shard names are plain file names next to the index; others are refused, printed on one line.
    #[test]
    fn index_shards_are_plain_file_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = dir.path().join("model.safetensors.index.json");
        for file in ["../model.safetensors", "/etc/passwd", "sub/model.safetensors", "x\n\u{1b}[2J", ".."] {
            let text = serde_json::json!({"weight_map": {"w": file}}).to_string();
            std::fs::write(&index, text).expect("write");
            let err = Catalog::open_index(&index).expect_err(file).to_string();
            assert!(err.contains("not the name of a file next to the index") && !err.contains('\n'), "{err}");
        }
    }
}
