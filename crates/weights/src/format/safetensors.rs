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
        return Err(header_err(path, format!("file has {} bytes, fewer than the 8-byte header length", file.len_bytes())));
    }
    let mut len_buf = [0u8; 8];
    file.read_exact_at(0, &mut len_buf)?;
    let n = u64::from_le_bytes(len_buf);
    if n > MAX_HEADER_BYTES || 8 + n > file.len_bytes() {
        return Err(header_err(path, format!("header length {n} does not fit in a file of {} bytes", file.len_bytes())));
    }
    let json = file.read_vec_at(8, n as usize)?;
    let meta: Metadata =
        serde_json::from_slice(&json).map_err(|e| header_err(path, format!("header JSON does not parse: {e}")))?;

    let data_start = 8 + n;
    let data_len = file.len_bytes() - data_start;
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
                format!("tensor '{name}' ends at byte {end} of a data section of only {data_len} bytes (truncated file?)"),
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
    Ok(entries)
}
