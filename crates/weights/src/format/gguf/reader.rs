//! GGUF v2/v3 reader with positioned reads (docs/models.md §7.1).
//!
//! Layout: `"GGUF"`, version u32, n_tensors u64, n_kv u64; the key/value pairs; the tensor infos
//! (name, n_dims u32, dims u64 fastest-first, ggml type u32, offset u64 relative to the data
//! section); padding to `general.alignment` (default 32); the data section. All little endian.
//!
//! Every count and length read from the file is checked before anything is allocated for it:
//! against a sane cap and against the bytes left in the file, so a corrupt header is an error,
//! never a huge allocation.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use ollm_io::ReadFile;

use super::ggml_type::GgmlType;
use super::metadata::{MetaValue, Metadata, ValueType};
use super::quant;
use crate::{Result, WeightsError};

pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
pub const DEFAULT_ALIGNMENT_BYTES: u64 = 32;

/// Longest metadata key or tensor name accepted (ggml itself limits tensor names to 64 bytes).
const MAX_NAME_BYTES: u64 = 64 * 1024;
/// Longest string value accepted (chat templates are the longest real ones, tens of KB).
const MAX_STRING_BYTES: u64 = 64 * 1024 * 1024;
/// Most items in one array (vocabularies and merge lists are well under a million).
const MAX_ARRAY_ITEMS: u64 = 16 * 1024 * 1024;
/// Most array items in all the metadata together. Each decoded item takes a `MetaValue` (32
/// bytes) however few bytes it had in the file (a u8 has 1), so this, not the file's length,
/// bounds the memory of the parsed metadata: 4 Mi items are 128 MiB at most (plus the string
/// bytes, no more than the file has), and the largest real vocabularies (262,144 tokens, with
/// their scores and types, and the merges: about 1.3 Mi items) use under a third of it.
const MAX_METADATA_ITEMS: u64 = 4 * 1024 * 1024;
/// Arrays of arrays are allowed by the format; deeper nesting than this is corruption.
const MAX_ARRAY_DEPTH: u32 = 4;
const MAX_KV_PAIRS: u64 = 1024 * 1024;
const MAX_TENSORS: u64 = 1024 * 1024;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// Bytes fetched per positioned read while parsing the header.
const READ_CHUNK_BYTES: u64 = 1024 * 1024;

/// One tensor's entry in the file: where its bytes are and how to read them.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as stored, fastest-varying first: an HF `[out, in]` matrix is `[in, out]`.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute offset of the first byte in the file.
    pub offset_bytes: u64,
    pub len_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Elements per row (the fastest dimension); quantisation blocks run along it.
    pub fn row_len(&self) -> u64 {
        self.dims[0]
    }

    pub fn n_rows(&self) -> u64 {
        self.n_elements() / self.row_len()
    }

    pub fn row_bytes(&self) -> u64 {
        self.len_bytes / self.n_rows()
    }

    /// The shape slowest-first, as PyTorch and safetensors write it (`[out, in]`).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open GGUF file: its parsed header and the handle for reading tensor bytes. Owns the file.
#[derive(Debug)]
pub struct GgufFile {
    file: ReadFile,
    version: u32,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    alignment_bytes: u64,
    data_start_bytes: u64,
}

fn format_err(path: &Path, detail: impl Into<String>) -> WeightsError {
    WeightsError::Format { path: path.to_path_buf(), detail: detail.into() }
}

impl GgufFile {
    /// Opens and validates `path`: header, metadata, tensor infos and every tensor's byte range.
    pub fn open(path: &Path) -> Result<Self> {
        let file = ReadFile::open(path)?;
        let mut cur = Cursor::new(&file);
        let (version, n_tensors, n_kv) = read_preamble(&mut cur)?;

        let mut entries = BTreeMap::new();
        for index in 0..n_kv {
            let key = cur.string(MAX_NAME_BYTES, &format!("the key of metadata pair {index}"))?;
            let what = format!("metadata '{key}'");
            let vtype = cur.value_type(&what)?;
            let value = cur.value(vtype, 0, &what)?;
            if entries.insert(key.clone(), value).is_some() {
                return Err(format_err(path, format!("metadata key '{key}' appears twice (corrupt file)")));
            }
        }
        let metadata = Metadata::new(path, entries);
        let alignment_bytes = alignment_of(&metadata)?;

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut names = HashSet::new();
        for index in 0..n_tensors {
            let info = read_tensor_info(&mut cur, index, alignment_bytes)?;
            if !names.insert(info.name.clone()) {
                return Err(format_err(path, format!("tensor '{}' is listed twice (corrupt file)", info.name)));
            }
            tensors.push(info);
        }
        let data_start_bytes = cur.pos.next_multiple_of(alignment_bytes);
        place_tensors(path, &mut tensors, data_start_bytes, file.len_bytes())?;
        Ok(Self { file, version, metadata, tensors, alignment_bytes, data_start_bytes })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn alignment_bytes(&self) -> u64 {
        self.alignment_bytes
    }

    pub fn data_start_bytes(&self) -> u64 {
        self.data_start_bytes
    }

    pub fn file_len_bytes(&self) -> u64 {
        self.file.len_bytes()
    }

    /// Reads the raw (still quantised) bytes of rows `first_row..first_row + n_rows`.
    pub fn read_rows(&self, t: &TensorInfo, first_row: u64, n_rows: u64) -> Result<Vec<u8>> {
        let end_row = first_row.checked_add(n_rows).filter(|&e| e <= t.n_rows()).ok_or_else(|| {
            format_err(
                self.path(),
                format!("tensor '{}': rows {first_row}..+{n_rows} are past its {} rows", t.name, t.n_rows()),
            )
        })?;
        let row_bytes = t.row_bytes();
        let len = usize::try_from((end_row - first_row) * row_bytes)
            .map_err(|_| format_err(self.path(), format!("tensor '{}' is too large for this machine", t.name)))?;
        Ok(self.file.read_vec_at(t.offset_bytes + first_row * row_bytes, len)?)
    }

    /// Dequantises raw bytes of tensor `t` (whole rows) into `dst`, naming the tensor on error.
    pub fn dequantize(&self, t: &TensorInfo, raw: &[u8], dst: &mut [f32]) -> Result<()> {
        quant::dequantize(t.ggml_type, raw, dst)
            .map_err(|e| format_err(self.path(), format!("tensor '{}': {e}", t.name)))
    }

    /// The whole tensor as f32, in file order (fastest dimension innermost).
    pub fn read_f32(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        let raw = self.read_rows(t, 0, t.n_rows())?;
        let mut out = vec![0f32; t.n_elements() as usize];
        self.dequantize(t, &raw, &mut out)?;
        Ok(out)
    }
}

/// Magic, version and the two counts, each checked.
fn read_preamble(cur: &mut Cursor<'_>) -> Result<(u32, u64, u64)> {
    let path = cur.file.path();
    let magic = cur.take(4, "the magic")?;
    if magic != GGUF_MAGIC {
        return Err(format_err(
            path,
            format!("does not start with the GGUF magic \"GGUF\" (found {magic:02x?}); is this a GGUF file?"),
        ));
    }
    let version = cur.u32("the version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(format_err(
                path,
                "GGUF version 1 (2023, 32-bit counts) is not supported; re-convert the model with a current llama.cpp",
            ));
        }
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            return Err(format_err(
                path,
                "is a big-endian GGUF file, which ollm does not read; use the little-endian file",
            ));
        }
        v => return Err(format_err(path, format!("GGUF version {v} is not supported (ollm reads versions 2 and 3)"))),
    }
    let n_tensors = cur.u64("the tensor count")?;
    let n_kv = cur.u64("the metadata count")?;
    // Each tensor info takes at least 8 (name len) + 4 + 8 + 4 + 8 bytes; each pair at least 8 + 4 + 1.
    if n_tensors > MAX_TENSORS || n_tensors.saturating_mul(32) > cur.remaining() {
        return Err(format_err(
            path,
            format!("tensor count {n_tensors} is impossible for this file (corrupt header?)"),
        ));
    }
    if n_kv > MAX_KV_PAIRS || n_kv.saturating_mul(13) > cur.remaining() {
        return Err(format_err(path, format!("metadata count {n_kv} is impossible for this file (corrupt header?)")));
    }
    Ok((version, n_tensors, n_kv))
}

/// `general.alignment`: a power of two, default 32.
fn alignment_of(meta: &Metadata) -> Result<u64> {
    match meta.opt_u64("general.alignment")? {
        None => Ok(DEFAULT_ALIGNMENT_BYTES),
        Some(a) if a.is_power_of_two() && a <= 1 << 30 => Ok(a),
        Some(a) => Err(meta.err("general.alignment", format!("{a} is not a power of two (corrupt file?)"))),
    }
}

fn read_tensor_info(cur: &mut Cursor<'_>, index: u64, alignment_bytes: u64) -> Result<TensorInfo> {
    let path = cur.file.path().to_path_buf();
    let name = cur.string(MAX_NAME_BYTES, &format!("the name of tensor {index}"))?;
    let what = format!("tensor '{name}'");
    let n_dims = cur.u32(&what)?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(format_err(&path, format!("{what} has {n_dims} dimensions (ggml allows 1 to {MAX_DIMS})")));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(cur.u64(&what)?);
    }
    let type_id = cur.u32(&what)?;
    let rel_offset = cur.u64(&what)?;
    let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
        format_err(
            &path,
            format!("{what} has ggml type id {type_id}, which ollm does not know (written by a newer llama.cpp?)"),
        )
    })?;
    if dims.contains(&0) {
        return Err(format_err(&path, format!("{what} has an empty dimension {dims:?}")));
    }
    if dims[0] % ggml_type.block_elems() != 0 {
        return Err(format_err(
            &path,
            format!(
                "{what}: rows of {} weights are not whole {} blocks of {}",
                dims[0],
                ggml_type.name(),
                ggml_type.block_elems()
            ),
        ));
    }
    let n_elems = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
    let len_bytes = n_elems.and_then(|n| ggml_type.bytes_for(n)).ok_or_else(|| {
        format_err(&path, format!("{what}: dims {dims:?} of {} overflow (corrupt file?)", ggml_type.name()))
    })?;
    if rel_offset % alignment_bytes != 0 {
        return Err(format_err(
            &path,
            format!("{what}: offset {rel_offset} is not a multiple of the alignment {alignment_bytes}"),
        ));
    }
    // offset_bytes is relative until place_tensors adds the data start.
    Ok(TensorInfo { name, dims, ggml_type, offset_bytes: rel_offset, len_bytes })
}

/// Turns relative offsets into absolute ones and checks every range lies in the file and that
/// no two tensors overlap.
fn place_tensors(path: &Path, tensors: &mut [TensorInfo], data_start: u64, file_len: u64) -> Result<()> {
    for t in tensors.iter_mut() {
        let start = data_start.checked_add(t.offset_bytes);
        let end = start.and_then(|s| s.checked_add(t.len_bytes));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => t.offset_bytes = start,
            _ => {
                return Err(format_err(
                    path,
                    format!(
                        "tensor '{}' ({} {:?}) needs bytes up to {} past the data start {data_start}, but the file has only {file_len} bytes (truncated download? re-download it)",
                        t.name,
                        t.ggml_type.name(),
                        t.dims,
                        t.offset_bytes.saturating_add(t.len_bytes)
                    ),
                ));
            }
        }
    }
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
    by_offset.sort_by_key(|t| t.offset_bytes);
    for pair in by_offset.windows(2) {
        if pair[0].offset_bytes + pair[0].len_bytes > pair[1].offset_bytes {
            return Err(format_err(
                path,
                format!("tensors '{}' and '{}' overlap (corrupt file)", pair[0].name, pair[1].name),
            ));
        }
    }
    Ok(())
}

/// Sequential reading of the header through a buffer of positioned reads: the header holds
/// hundreds of thousands of small fields (a vocabulary), too many for one read each.
struct Cursor<'a> {
    file: &'a ReadFile,
    /// Absolute position of the next byte to parse.
    pos: u64,
    buf: Vec<u8>,
    /// Absolute position of `buf[0]`.
    buf_start: u64,
    /// Array items the metadata may still decode (see [`MAX_METADATA_ITEMS`]).
    items_left: u64,
}

impl<'a> Cursor<'a> {
    fn new(file: &'a ReadFile) -> Self {
        Self { file, pos: 0, buf: Vec::new(), buf_start: 0, items_left: MAX_METADATA_ITEMS }
    }

    fn remaining(&self) -> u64 {
        self.file.len_bytes().saturating_sub(self.pos)
    }

    /// The next `n` bytes; `n` is always checked against a cap by the caller before this.
    fn take(&mut self, n: u64, what: &str) -> Result<&[u8]> {
        if n > self.remaining() {
            return Err(format_err(
                self.file.path(),
                format!(
                    "the file ends at byte {} while reading {what} ({n} bytes at byte {}; truncated file?)",
                    self.file.len_bytes(),
                    self.pos
                ),
            ));
        }
        let end = self.pos + n;
        if self.pos < self.buf_start || end > self.buf_start + self.buf.len() as u64 {
            let len = n.max(READ_CHUNK_BYTES).min(self.remaining());
            self.buf.resize(len as usize, 0);
            self.file.read_exact_at(self.pos, &mut self.buf)?;
            self.buf_start = self.pos;
        }
        let at = (self.pos - self.buf_start) as usize;
        self.pos = end;
        Ok(&self.buf[at..at + n as usize])
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, max_bytes: u64, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        if len > max_bytes {
            return Err(format_err(
                self.file.path(),
                format!("{what}: string length {len} exceeds the limit of {max_bytes} bytes (corrupt file?)"),
            ));
        }
        let bytes = self.take(len, what)?.to_vec();
        String::from_utf8(bytes)
            .map_err(|e| format_err(self.file.path(), format!("{what}: string is not valid UTF-8 ({e})")))
    }

    fn value_type(&mut self, what: &str) -> Result<ValueType> {
        let id = self.u32(what)?;
        ValueType::from_id(id).ok_or_else(|| {
            format_err(
                self.file.path(),
                format!("{what}: unknown value type {id} (GGUF defines 0 to 12; corrupt file?)"),
            )
        })
    }

    fn value(&mut self, vtype: ValueType, depth: u32, what: &str) -> Result<MetaValue> {
        Ok(match vtype {
            ValueType::U8 => MetaValue::U8(u8::from_le_bytes(self.array(what)?)),
            ValueType::I8 => MetaValue::I8(i8::from_le_bytes(self.array(what)?)),
            ValueType::U16 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => MetaValue::U32(self.u32(what)?),
            ValueType::I32 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::U64 => MetaValue::U64(self.u64(what)?),
            ValueType::I64 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Bool => match self.array::<1>(what)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => {
                    return Err(format_err(
                        self.file.path(),
                        format!("{what}: bool byte is {b}, not 0 or 1 (corrupt file?)"),
                    ));
                }
            },
            ValueType::String => MetaValue::String(self.string(MAX_STRING_BYTES, what)?),
            ValueType::Array => self.array_value(depth, what)?,
        })
    }

    fn array_value(&mut self, depth: u32, what: &str) -> Result<MetaValue> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(format_err(
                self.file.path(),
                format!("{what}: arrays nested deeper than {MAX_ARRAY_DEPTH} (corrupt file?)"),
            ));
        }
        let elem_type = self.value_type(what)?;
        let count = self.u64(what)?;
        if count > MAX_ARRAY_ITEMS || count.saturating_mul(elem_type.min_size_bytes()) > self.remaining() {
            return Err(format_err(
                self.file.path(),
                format!(
                    "{what}: array of {count} {elem_type:?} cannot fit in the {} bytes left (corrupt file?)",
                    self.remaining()
                ),
            ));
        }
        if count > self.items_left {
            return Err(format_err(
                self.file.path(),
                format!(
                    "{what}: array of {count} {elem_type:?} takes the metadata past {MAX_METADATA_ITEMS} array items in all (corrupt file?)"
                ),
            ));
        }
        self.items_left -= count;
        let mut items = Vec::with_capacity(count as usize);
        for _ in 0..count {
            items.push(self.value(elem_type, depth + 1, what)?);
        }
        Ok(MetaValue::Array { elem_type, items })
    }
}

#[cfg(test)]
mod tests {
    use super::super::writer::GgufWriter;
    use super::*;

    fn write_tmp(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.gguf");
        std::fs::write(&path, bytes).expect("write");
        (dir, path)
    }

    fn open_err(bytes: &[u8]) -> String {
        let (_dir, path) = write_tmp(bytes);
        GgufFile::open(&path).expect_err("must fail").to_string()
    }

    fn sample() -> GgufWriter {
        let mut w = GgufWriter::new();
        w.kv("general.architecture", MetaValue::String("llama".into()))
            .kv("u8", MetaValue::U8(200))
            .kv("i8", MetaValue::I8(-5))
            .kv("u16", MetaValue::U16(60000))
            .kv("i16", MetaValue::I16(-30000))
            .kv("u32", MetaValue::U32(4_000_000_000))
            .kv("i32", MetaValue::I32(-7))
            .kv("f32", MetaValue::F32(0.5))
            .kv("bool", MetaValue::Bool(true))
            .kv("u64", MetaValue::U64(1 << 40))
            .kv("i64", MetaValue::I64(-(1 << 40)))
            .kv("f64", MetaValue::F64(-2.5))
            .kv(
                "strs",
                MetaValue::Array {
                    elem_type: ValueType::String,
                    items: vec![MetaValue::String("a b".into()), MetaValue::String("ĠĠ".into())],
                },
            )
            .kv(
                "nested",
                MetaValue::Array {
                    elem_type: ValueType::Array,
                    items: vec![MetaValue::Array { elem_type: ValueType::I32, items: vec![MetaValue::I32(1)] }],
                },
            );
        let f32s: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        w.tensor("a", &[3, 2], GgmlType::F32, f32s);
        // Q8_0 with d = 0.25 and every q = 1.
        let q8: Vec<u8> = half::f16::from_f32(0.25).to_le_bytes().into_iter().chain([1u8; 32]).collect();
        w.tensor("b", &[32], GgmlType::Q8_0, q8);
        w
    }

    #[test]
    fn reads_all_value_types_and_tensors() {
        for version in [2, 3] {
            let mut w = sample();
            w.version(version);
            let (_dir, path) = write_tmp(&w.to_bytes());
            let g = GgufFile::open(&path).expect("open");
            assert_eq!(g.version(), version);
            let m = g.metadata();
            assert_eq!(m.str("general.architecture").expect("arch"), "llama");
            for (key, want) in [
                ("u8", MetaValue::U8(200)),
                ("i8", MetaValue::I8(-5)),
                ("u16", MetaValue::U16(60000)),
                ("i16", MetaValue::I16(-30000)),
                ("u32", MetaValue::U32(4_000_000_000)),
                ("i32", MetaValue::I32(-7)),
                ("f32", MetaValue::F32(0.5)),
                ("bool", MetaValue::Bool(true)),
                ("u64", MetaValue::U64(1 << 40)),
                ("i64", MetaValue::I64(-(1 << 40))),
                ("f64", MetaValue::F64(-2.5)),
            ] {
                assert_eq!(m.get(key), Some(&want), "{key}");
            }
            assert_eq!(m.opt_str_array("strs").expect("strs"), Some(vec!["a b", "ĠĠ"]));
            assert!(matches!(m.get("nested"), Some(MetaValue::Array { elem_type: ValueType::Array, .. })));

            assert_eq!(g.data_start_bytes() % 32, 0);
            let a = g.tensor("a").expect("a");
            assert_eq!((a.dims.clone(), a.shape(), a.n_rows(), a.row_bytes()), (vec![3, 2], vec![2, 3], 2, 12));
            assert_eq!(g.read_f32(a).expect("a"), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
            assert_eq!(g.read_f32(g.tensor("b").expect("b")).expect("b"), vec![0.25; 32]);
            assert_eq!(g.read_rows(a, 1, 1).expect("row 1").len(), 12);
            assert!(g.read_rows(a, 1, 2).is_err());
        }
    }

    #[test]
    fn honours_general_alignment() {
        let mut w = sample();
        w.kv("general.alignment", MetaValue::U32(64));
        let (_dir, path) = write_tmp(&w.to_bytes());
        let g = GgufFile::open(&path).expect("open");
        assert_eq!((g.alignment_bytes(), g.data_start_bytes() % 64), (64, 0));
        assert_eq!(g.read_f32(g.tensor("b").expect("b")).expect("b"), vec![0.25; 32]);

        let mut bad = sample();
        bad.kv("general.alignment", MetaValue::U32(48));
        assert!(open_err(&bad.to_bytes()).contains("power of two"));
    }

    #[test]
    fn rejects_bad_magic_and_versions() {
        let good = sample().to_bytes();
        let mut b = good.clone();
        b[0] = b'X';
        assert!(open_err(&b).contains("magic"));
        for (version, needle) in [(1u32, "version 1"), (4, "version 4"), (3u32.swap_bytes(), "big-endian")] {
            let mut b = good.clone();
            b[4..8].copy_from_slice(&version.to_le_bytes());
            let err = open_err(&b);
            assert!(err.contains(needle), "{err}");
        }
        assert!(open_err(b"GG").contains("ends at byte 2"));
    }

    #[test]
    fn rejects_absurd_counts_and_lengths() {
        let good = sample().to_bytes();
        let mut b = good.clone();
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // tensor count
        assert!(open_err(&b).contains("tensor count"));
        let mut b = good.clone();
        b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes()); // kv count
        assert!(open_err(&b).contains("metadata count"));
        // The first key's length: a terabyte.
        let mut b = good.clone();
        b[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(open_err(&b).contains("exceeds the limit"));

        // An array that claims more items than the file has bytes.
        let mut w = GgufWriter::new();
        w.kv("arr", MetaValue::Array { elem_type: ValueType::U32, items: vec![MetaValue::U32(1); 4] });
        let mut b = w.to_bytes();
        let key_end = 24 + 8 + 3; // preamble, key length, "arr"
        let count_at = key_end + 4 + 4; // value type, element type
        b[count_at..count_at + 8].copy_from_slice(&(1u64 << 30).to_le_bytes());
        assert!(open_err(&b).contains("cannot fit"));
    }

    #[test]
    fn rejects_truncated_data_and_bad_tensor_infos() {
        let good = sample().to_bytes();
        let err = open_err(&good[..good.len() - 1]);
        assert!(err.contains("tensor 'b'") && err.contains("truncated"), "{err}");

        let mut w = GgufWriter::new();
        w.tensor("odd", &[48, 2], GgmlType::Q4_1, vec![0u8; 60]);
        assert!(open_err(&w.to_bytes()).contains("whole Q4_1 blocks"));

        let mut w = GgufWriter::new();
        w.raw_tensor_info("t", &[4], 77, 0);
        assert!(open_err(&w.to_bytes()).contains("ggml type id 77"));

        let mut w = GgufWriter::new();
        w.tensor("x", &[8], GgmlType::F32, vec![0u8; 32]);
        w.raw_tensor_info("y", &[8], 0, 0); // same bytes as x
        assert!(open_err(&w.to_bytes()).contains("overlap"));

        let mut w = GgufWriter::new();
        w.raw_tensor_info("z", &[1, 1, 1, 1, 1], 0, 0);
        assert!(open_err(&w.to_bytes()).contains("5 dimensions"));
    }

    #[test]
    fn rejects_bad_values() {
        let mut w = GgufWriter::new();
        w.kv("flag", MetaValue::Bool(true));
        let mut b = w.to_bytes();
        let at = 24 + 8 + 4 + 4; // preamble, key length, "flag", value type
        b[at] = 2;
        assert!(open_err(&b).contains("bool byte is 2"));

        let mut w = GgufWriter::new();
        w.kv("s", MetaValue::String("ok".into()));
        let mut b = w.to_bytes();
        let at = 24 + 8 + 1 + 4 + 8; // preamble, key len, "s", type, string len
        b[at] = 0xFF;
        assert!(open_err(&b).contains("UTF-8"));

        let mut w = GgufWriter::new();
        w.kv("dup", MetaValue::U8(1)).kv("dup", MetaValue::U8(2));
        assert!(open_err(&w.to_bytes()).contains("appears twice"));
    }

    /// Hand-written header: `n` u8 arrays of `len` items each (the writer would need a
    /// `MetaValue` per byte to build it).
    fn byte_arrays(n: usize, len: usize) -> Vec<u8> {
        let mut b = Vec::with_capacity(24 + n * (len + 32));
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&(n as u64).to_le_bytes());
        for i in 0..n {
            let key = format!("junk.{i}");
            b.extend_from_slice(&(key.len() as u64).to_le_bytes());
            b.extend_from_slice(key.as_bytes());
            b.extend_from_slice(&9u32.to_le_bytes()); // array
            b.extend_from_slice(&0u32.to_le_bytes()); // of u8
            b.extend_from_slice(&(len as u64).to_le_bytes());
            b.resize(b.len() + len, 7);
        }
        b
    }

    /// 5 arrays of 1 Mi bytes: once 5 Mi values of 32 bytes (160 MiB for a 5 MiB file, and
    /// 2.6 GB for 5 × 16 Mi); now an error once the metadata passes 4 Mi items in all.
    #[test]
    fn metadata_items_are_bounded_in_all() {
        let err = open_err(&byte_arrays(5, 1 << 20));
        assert!(err.contains("'junk.4'") && err.contains("array items in all"), "{err}");
        let (_dir, path) = write_tmp(&byte_arrays(3, 1 << 20));
        assert_eq!(GgufFile::open(&path).expect("3 Mi items fit").metadata().len(), 3);
    }

    /// A key corrupted into control bytes prints escaped, on one line.
    #[test]
    fn control_bytes_in_keys_print_escaped() {
        let mut w = GgufWriter::new();
        w.kv("a\nb\x1b[2Jc", MetaValue::U8(1)).kv("a\nb\x1b[2Jc", MetaValue::U8(2));
        let err = open_err(&w.to_bytes());
        assert!(!err.contains('\n') && !err.contains('\x1b'), "{err:?}");
        assert!(err.contains("a\\nb\\u{1b}[2Jc") && err.contains("appears twice"), "{err}");
    }
}
