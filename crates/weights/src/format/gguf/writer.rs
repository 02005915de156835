//! A minimal in-memory GGUF writer, for tests and tiny fixtures: metadata plus raw tensor bytes.
//! It writes exactly what it is given (duplicate keys, odd tensor infos included), so tests can
//! also build invalid files on purpose. Not meant for real models: it holds the whole file in RAM.

use super::ggml_type::GgmlType;
use super::metadata::{MetaValue, ValueType};
use super::reader::{DEFAULT_ALIGNMENT_BYTES, GGUF_MAGIC};

/// One tensor info; `data` is empty for infos added with [`GgufWriter::raw_tensor_info`].
#[derive(Debug, Clone)]
struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    type_id: u32,
    /// Offset relative to the data section; `None`: placed after the previous tensor.
    rel_offset: Option<u64>,
    data: Vec<u8>,
}

/// Collects metadata and tensors, then serialises them with [`GgufWriter::to_bytes`].
#[derive(Debug, Clone)]
pub struct GgufWriter {
    version: u32,
    kvs: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// A version-3 file with no metadata and no tensors.
    pub fn new() -> Self {
        Self { version: 3, kvs: Vec::new(), tensors: Vec::new() }
    }

    pub fn version(&mut self, version: u32) -> &mut Self {
        self.version = version;
        self
    }

    pub fn kv(&mut self, key: &str, value: MetaValue) -> &mut Self {
        self.kvs.push((key.to_string(), value));
        self
    }

    /// Adds a tensor; `dims` fastest-first, `data` already in the type's block format.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> &mut Self {
        let t = PendingTensor { name: name.to_string(), dims: dims.to_vec(), type_id: ty.id(), rel_offset: None, data };
        self.tensors.push(t);
        self
    }

    /// Adds a tensor info with any type id and offset and no data (for invalid-file tests).
    pub fn raw_tensor_info(&mut self, name: &str, dims: &[u64], type_id: u32, rel_offset: u64) -> &mut Self {
        let t = PendingTensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            type_id,
            rel_offset: Some(rel_offset),
            data: Vec::new(),
        };
        self.tensors.push(t);
        self
    }

    fn alignment_bytes(&self) -> u64 {
        self.kvs
            .iter()
            .rev()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .filter(|&a| a > 0)
            .unwrap_or(DEFAULT_ALIGNMENT_BYTES)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let align = self.alignment_bytes();
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (key, value) in &self.kvs {
            put_string(&mut out, key);
            out.extend_from_slice(&type_id(value).to_le_bytes());
            put_value(&mut out, value);
        }
        let mut data = Vec::new();
        for t in &self.tensors {
            put_string(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.type_id.to_le_bytes());
            let rel = match t.rel_offset {
                Some(rel) => rel,
                None => {
                    data.resize((data.len() as u64).next_multiple_of(align) as usize, 0);
                    let rel = data.len() as u64;
                    data.extend_from_slice(&t.data);
                    rel
                }
            };
            out.extend_from_slice(&rel.to_le_bytes());
        }
        out.resize((out.len() as u64).next_multiple_of(align) as usize, 0);
        out.extend_from_slice(&data);
        out
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn value_type_id(t: ValueType) -> u32 {
    use ValueType::*;
    match t {
        U8 => 0,
        I8 => 1,
        U16 => 2,
        I16 => 3,
        U32 => 4,
        I32 => 5,
        F32 => 6,
        Bool => 7,
        String => 8,
        Array => 9,
        U64 => 10,
        I64 => 11,
        F64 => 12,
    }
}

fn type_id(v: &MetaValue) -> u32 {
    value_type_id(match v {
        MetaValue::U8(_) => ValueType::U8,
        MetaValue::I8(_) => ValueType::I8,
        MetaValue::U16(_) => ValueType::U16,
        MetaValue::I16(_) => ValueType::I16,
        MetaValue::U32(_) => ValueType::U32,
        MetaValue::I32(_) => ValueType::I32,
        MetaValue::F32(_) => ValueType::F32,
        MetaValue::Bool(_) => ValueType::Bool,
        MetaValue::String(_) => ValueType::String,
        MetaValue::Array { .. } => ValueType::Array,
        MetaValue::U64(_) => ValueType::U64,
        MetaValue::I64(_) => ValueType::I64,
        MetaValue::F64(_) => ValueType::F64,
    })
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::String(s) => put_string(out, s),
        MetaValue::Array { elem_type, items } => {
            out.extend_from_slice(&value_type_id(*elem_type).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}
