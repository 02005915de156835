//! GGUF metadata: typed key/value pairs, and accessors that name the file and key in every error.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::{Result, WeightsError};

/// The value types of GGUF metadata (the u32 written before each value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    pub fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Bytes one value of this type takes in the file at least (strings: their u64 length;
    /// arrays: element type + count). Used to bound array counts by the bytes left in the file.
    pub fn min_size_bytes(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// One metadata value. Arrays keep their element type so an empty array still has one.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array { elem_type: ValueType, items: Vec<MetaValue> },
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// The value as a signed integer, if it is an integer of any width (u64 above i64::MAX: None).
    pub fn as_i64(&self) -> Option<i64> {
        use MetaValue::*;
        match *self {
            U8(v) => Some(v.into()),
            I8(v) => Some(v.into()),
            U16(v) => Some(v.into()),
            I16(v) => Some(v.into()),
            U32(v) => Some(v.into()),
            I32(v) => Some(v.into()),
            U64(v) => i64::try_from(v).ok(),
            I64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a non-negative integer, if it is one.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U64(v) => Some(v),
            _ => self.as_i64().and_then(|v| u64::try_from(v).ok()),
        }
    }

    /// The value as a float, if it is a float or an integer.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            // Through the f32's shortest decimal form, so 1e-5f32 becomes 1e-5, not 9.99999974e-6:
            // config.json then reads like the original checkpoint's.
            MetaValue::F32(v) => v.to_string().parse().ok(),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// A short description for error messages: the type, and the value when it is small.
    pub fn describe(&self) -> String {
        match self {
            MetaValue::String(s) if s.len() > 40 => format!("a string of {} bytes", s.len()),
            MetaValue::String(s) => format!("the string {s:?}"),
            MetaValue::Array { elem_type, items } => format!("an array of {} {elem_type:?}", items.len()),
            other => format!("{other:?}"),
        }
    }
}

impl fmt::Display for MetaValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// All metadata of one GGUF file. Owns the values; remembers the path for error messages.
#[derive(Clone, Debug)]
pub struct Metadata {
    path: PathBuf,
    entries: BTreeMap<String, MetaValue>,
}

impl Metadata {
    pub fn new(path: &Path, entries: BTreeMap<String, MetaValue>) -> Self {
        Self { path: path.to_path_buf(), entries }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.entries.get(key)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &MetaValue)> {
        self.entries.iter()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A `Format` error about `key` in this file.
    pub fn err(&self, key: &str, detail: impl fmt::Display) -> WeightsError {
        WeightsError::Format { path: self.path.clone(), detail: format!("metadata '{key}': {detail}") }
    }

    fn typed<T>(&self, key: &str, want: &str, f: impl Fn(&MetaValue) -> Option<T>) -> Result<Option<T>> {
        match self.entries.get(key) {
            None => Ok(None),
            Some(v) => f(v).map(Some).ok_or_else(|| self.err(key, format!("expected {want}, found {v}"))),
        }
    }

    fn required<T>(&self, key: &str, value: Option<T>) -> Result<T> {
        value.ok_or_else(|| self.err(key, "missing (the file was written by a converter that ollm does not know; re-convert it with a recent llama.cpp)"))
    }

    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "a non-negative integer", MetaValue::as_u64)
    }

    pub fn u64(&self, key: &str) -> Result<u64> {
        let v = self.opt_u64(key)?;
        self.required(key, v)
    }

    /// A positive integer that fits in usize (counts and sizes).
    pub fn opt_count(&self, key: &str) -> Result<Option<usize>> {
        match self.opt_u64(key)? {
            None => Ok(None),
            Some(0) => Err(self.err(key, "must be positive, found 0")),
            Some(v) => usize::try_from(v).map(Some).map_err(|_| self.err(key, format!("{v} is too large"))),
        }
    }

    pub fn count(&self, key: &str) -> Result<usize> {
        let v = self.opt_count(key)?;
        self.required(key, v)
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number", MetaValue::as_f64)
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", MetaValue::as_bool)
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.entries.get(key) {
            None => Ok(None),
            Some(MetaValue::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(key, format!("expected a string, found {v}"))),
        }
    }

    pub fn str(&self, key: &str) -> Result<&str> {
        let v = self.opt_str(key)?;
        self.required(key, v)
    }

    /// An array of strings (token lists, merges).
    pub fn opt_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        match self.entries.get(key) {
            None => Ok(None),
            Some(v @ MetaValue::Array { items, .. }) => items
                .iter()
                .map(MetaValue::as_str)
                .collect::<Option<Vec<&str>>>()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected an array of strings, found {v}"))),
            Some(v) => Err(self.err(key, format!("expected an array of strings, found {v}"))),
        }
    }

    /// An array of integers of any width (token types).
    pub fn opt_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        self.typed(key, "an array of integers", |v| match v {
            MetaValue::Array { items, .. } => items.iter().map(MetaValue::as_i64).collect(),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: Vec<(&str, MetaValue)>) -> Metadata {
        let entries = pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        Metadata::new(Path::new("m.gguf"), entries)
    }

    #[test]
    fn integers_of_any_width_convert() {
        let m = meta(vec![("a", MetaValue::U32(7)), ("b", MetaValue::I8(-1)), ("c", MetaValue::U64(u64::MAX))]);
        assert_eq!(m.u64("a").expect("u32"), 7);
        assert!(m.opt_u64("b").is_err(), "negative is not a u64");
        assert_eq!(m.opt_u64("c").expect("u64"), Some(u64::MAX));
        assert_eq!(m.opt_u64("missing").expect("absent"), None);
        let err = m.u64("missing").expect_err("required").to_string();
        assert!(err.contains("'missing'") && err.contains("m.gguf"), "{err}");
    }

    #[test]
    fn f32_goes_through_its_shortest_decimal() {
        let m = meta(vec![("eps", MetaValue::F32(1e-5)), ("theta", MetaValue::F32(500000.0))]);
        assert_eq!(m.opt_f64("eps").expect("f32"), Some(1e-5));
        assert_eq!(m.opt_f64("theta").expect("f32"), Some(500000.0));
    }

    #[test]
    fn wrong_types_are_named() {
        let m = meta(vec![
            ("s", MetaValue::String("gpt2".into())),
            ("arr", MetaValue::Array { elem_type: ValueType::String, items: vec![MetaValue::String("x".into())] }),
            ("ints", MetaValue::Array { elem_type: ValueType::I32, items: vec![MetaValue::I32(3)] }),
        ]);
        let err = m.opt_u64("s").expect_err("string is no int").to_string();
        assert!(err.contains("\"gpt2\""), "{err}");
        assert_eq!(m.opt_str_array("arr").expect("strings"), Some(vec!["x"]));
        assert!(m.opt_str_array("ints").is_err());
        assert_eq!(m.opt_i64_array("ints").expect("ints"), Some(vec![3]));
        assert_eq!(ValueType::from_id(12), Some(ValueType::F64));
        assert_eq!(ValueType::from_id(13), None);
    }
}
