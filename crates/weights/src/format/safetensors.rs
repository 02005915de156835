//! safetensors headers: `u64 n` (little endian), `n` bytes of JSON, then the data section.
//!
//! The JSON is parsed by the `safetensors` crate; the byte ranges are checked here against the
//! file's real length, so a header that lies about offsets is caught before any read.

use std::path::Path;

use ollm_io::ReadFile;
use ollm_ops::DType;
use safetensors::tensor::{Dtype, Metadata};

use crate::{Result, WeightsError};

/// Largest header accepted (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// One tensor's header entry with absolute file offsets.
#[derive(Debug, Clone)]
pub struct HeaderEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub offset_bytes: u64,
    pub len_bytes: u64,
}

fn header_err(path: &Path, detail: impl Into<String>) -> WeightsError {
    WeightsError::Header { path: path.to_path_buf(), detail: detail.into() }
}

/// Maps a safetensors dtype to ours, or names it in an error.
fn dtype_of(path: &Path, name: &str, dtype: Dtype) -> Result<DType> {
    match dtype {
        Dtype::BF16 => Ok(DType::BF16),
        Dtype::F16 => Ok(DType::F16),
        Dtype::F32 => Ok(DType::F32),
        Dtype::U8 => Ok(DType::U8),
        other => Err(WeightsError::UnsupportedDType {
            path: path.to_path_buf(),
            name: name.to_string(),
            dtype: format!("{other:?}"),
        }),
    }
}

/// Reads and checks the header of an open safetensors file. Entries come sorted by offset.
pub fn read_header(file: &ReadFile) -> Result<Vec<HeaderEntry>> {
    let path = file.path();
    if file.len_bytes() < 8 {
        return Err(header_err(
            path,
            format!("file has {} bytes, fewer than the 8-byte header length", file.len_bytes()),
        ));
    }
    let mut len_buf = [0u8; 8];
    file.read_exact_at(0, &mut len_buf)?;
    let n = u64::from_le_bytes(len_buf);
    if n > MAX_HEADER_BYTES || 8 + n > file.len_bytes() {
        return Err(header_err(
            path,
            format!("header length {n} does not fit in a file of {} bytes", file.len_bytes()),
        ));
    }
    let json = file.read_vec_at(8, n as usize)?;
    let data_start = 8 + n;
    let data_len = file.len_bytes() - data_start;
    let meta: Metadata = serde_json::from_slice(&json).map_err(|e| {
        // The crate's message does not say which tensor is wrong; find it ourselves if we can.
        let detail = diagnose(&json, data_len).unwrap_or_else(|| format!("header does not parse: {e}"));
        header_err(path, detail)
    })?;
    let mut entries = Vec::new();
    for (name, info) in meta.tensors() {
        let dtype = dtype_of(path, &name, info.dtype)?;
        let (start, end) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
        let numel = info.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
        let want = numel.and_then(|n| n.checked_mul(dtype.size_bytes() as u64));
        if end < start || Some(end - start) != want {
            return Err(header_err(
                path,
                format!("tensor '{name}': offsets {start}..{end} do not hold shape {:?} of {dtype}", info.shape),
            ));
        }
        if end > data_len {
            return Err(header_err(
                path,
                format!(
                    "tensor '{name}' ends at byte {end} of a data section of only {data_len} bytes (truncated file?)"
                ),
            ));
        }
        entries.push(HeaderEntry {
            name,
            dtype,
            shape: info.shape.clone(),
            offset_bytes: data_start + start,
            len_bytes: end - start,
        });
    }
    entries.sort_by_key(|e| e.offset_bytes);
    for pair in entries.windows(2) {
        if pair[0].offset_bytes + pair[0].len_bytes > pair[1].offset_bytes {
            return Err(header_err(path, format!("tensors '{}' and '{}' overlap", pair[0].name, pair[1].name)));
        }
    }
    // The tensors must cover the data section exactly, as the format requires (the parser has
    // checked they follow each other from offset 0): bytes after them mean the header and the
    // data disagree, a file edited or spliced by hand whose offsets no longer point at the
    // right tensors.
    let covered = entries.last().map_or(data_start, |e| e.offset_bytes + e.len_bytes);
    if covered != file.len_bytes() {
        return Err(header_err(
            path,
            format!(
                "{} bytes after the last tensor belong to no tensor; the tensors must cover the data section exactly",
                file.len_bytes() - covered
            ),
        ));
    }
    Ok(entries)
}

/// Names the first tensor whose header entry is inconsistent (size vs shape, gaps or overlaps,
/// past the end of the data), for a message more useful than "invalid header".
fn diagnose(json: &[u8], data_len: u64) -> Option<String> {
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(json).ok()?;
    let mut spans = Vec::new();
    for (name, v) in map.iter().filter(|(k, _)| k.as_str() != "__metadata__") {
        let offsets = v.get("data_offsets")?.as_array()?;
        let (start, end) = (offsets.first()?.as_u64()?, offsets.get(1)?.as_u64()?);
        let shape: Vec<u64> = v.get("shape")?.as_array()?.iter().map(|d| d.as_u64()).collect::<Option<_>>()?;
        let elem_bytes: u64 = match v.get("dtype")?.as_str()? {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            _ => 1,
        };
        let want = shape.iter().try_fold(elem_bytes, |a, &d| a.checked_mul(d))?;
        if end < start || end - start != want {
            return Some(format!("tensor '{name}': offsets {start}..{end} do not hold shape {shape:?} ({want} bytes)"));
        }
        if end > data_len {
            return Some(format!(
                "tensor '{name}' ends at byte {end} of a data section of only {data_len} bytes (truncated file?)"
            ));
        }
        spans.push((start, end, name.clone()));
    }
    spans.sort();
    let mut expect = 0;
    for (start, end, name) in spans {
        if start != expect {
            return Some(format!(
                "tensor '{name}' starts at byte {start}, expected {expect} (gap or overlap in the header)"
            ));
        }
        expect = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file of two F32 tensors of 4 values each; `data` follows the header as is.
    fn file_with(offsets: [(u64, u64); 2], data: &[u8]) -> (tempfile::TempDir, ReadFile) {
        let header = format!(
            r#"{{"a":{{"dtype":"F32","shape":[4],"data_offsets":[{},{}]}},"b":{{"dtype":"F32","shape":[4],"data_offsets":[{},{}]}}}}"#,
            offsets[0].0, offsets[0].1, offsets[1].0, offsets[1].1
        );
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, bytes).expect("write");
        let file = ReadFile::open(&path).expect("open");
        (dir, file)
    }

    #[test]
    fn tensors_cover_the_data_exactly() {
        let (_d, ok) = file_with([(0, 16), (16, 32)], &[0u8; 32]);
        let entries = read_header(&ok).expect("exact cover");
        assert_eq!(entries.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        // 64 stray bytes inside the data: the header still adds up, the file is longer.
        let (_d, trailing) = file_with([(0, 16), (16, 32)], &[0u8; 96]);
        let err = read_header(&trailing).expect_err("stray bytes").to_string();
        assert!(err.contains("64 bytes after the last tensor"), "{err}");
        let (_d, gap) = file_with([(0, 16), (80, 96)], &[0u8; 96]);
        let err = read_header(&gap).expect_err("gap").to_string();
        assert!(err.contains("tensor 'b' starts at byte 80, expected 16"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
}
