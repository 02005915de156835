//! Durable JSONL output: each line goes out in one `write` on an `O_APPEND` handle, followed by
//! `fsync`, so a crash can tear at most the last line. Reopening a results file cuts a torn
//! last line (one without its newline) and reports the ids already finished.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::BatchError;
use crate::reader::id_key;

/// Owns the append handle of one JSONL file.
#[derive(Debug)]
pub struct JsonlLog {
    file: File,
    path: PathBuf,
}

/// What reopening a results file found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Ids of the results already in the file.
    pub done: HashSet<String>,
    /// Bytes of a torn last line that were cut off (0 if none).
    pub torn_bytes: u64,
}

impl JsonlLog {
    /// Opens a results file for appending, first cutting a torn last line and collecting the ids
    /// already done.
    pub fn resume(path: &Path) -> Result<(Self, Recovered), BatchError> {
        let mut recovered = Recovered::default();
        if path.exists() {
            let bytes = std::fs::read(path).map_err(|e| BatchError::io(path, "read the results file", &e))?;
            let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            if whole < bytes.len() {
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| BatchError::io(path, "open the results file", &e))?;
                f.set_len(whole as u64)
                    .and_then(|()| f.sync_all())
                    .map_err(|e| BatchError::io(path, "cut the torn last line", &e))?;
                recovered.torn_bytes = (bytes.len() - whole) as u64;
            }
            for line in String::from_utf8_lossy(&bytes[..whole]).lines() {
                if let Some(key) = serde_json::from_str::<Value>(line).ok().and_then(|v| v.get("id").and_then(id_key)) {
                    recovered.done.insert(key);
                }
            }
        }
        Ok((Self::open(path, false)?, recovered))
    }

    /// Creates (or empties) a file for appending.
    pub fn create(path: &Path) -> Result<Self, BatchError> {
        Self::open(path, true)
    }

    fn open(path: &Path, truncate: bool) -> Result<Self, BatchError> {
        let mut o = OpenOptions::new();
        o.create(true);
        if truncate {
            o.write(true).truncate(true);
        } else {
            o.append(true);
        }
        let file = o.open(path).map_err(|e| BatchError::io(path, "open for writing", &e))?;
        Ok(Self { file, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one value as a line, in a single write, and waits until it is on disk.
    pub fn append<T: Serialize>(&mut self, value: &T) -> Result<(), BatchError> {
        let mut line = serde_json::to_vec(value)
            .map_err(|e| BatchError::Io { path: self.path.clone(), detail: format!("cannot encode a line: {e}") })?;
        line.push(b'\n');
        self.file.write_all(&line).map_err(|e| BatchError::io(&self.path, "append a line", &e))?;
        self.file.sync_data().map_err(|e| BatchError::io(&self.path, "flush a line to disk", &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_cuts_a_torn_line_and_reports_done_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("out.jsonl");
        std::fs::write(&p, "{\"id\":\"a\",\"text\":\"x\"}\n{\"id\":2,\"text\":\"y\"}\n{\"id\":\"c\",\"te")
            .expect("write");
        let (mut log, rec) = JsonlLog::resume(&p).expect("resume");
        assert_eq!(rec.torn_bytes, 13);
        assert_eq!(rec.done, ["a".to_string(), "2".to_string()].into_iter().collect());
        log.append(&serde_json::json!({"id": "c", "text": "z"})).expect("append");
        let text = std::fs::read_to_string(&p).expect("read");
        assert_eq!(text.lines().count(), 3);
        assert!(text.ends_with("{\"id\":\"c\",\"text\":\"z\"}\n"), "{text}");
    }
}
