//! A streaming safetensors writer: the header is written first from the planned tensor list,
//! then the data tensor by tensor (in chunks if wanted), so a model never has to sit in RAM
//! whole. Layout: `u64 n` (little endian), `n` bytes of JSON padded with spaces to a multiple of
//! 8, then each tensor's bytes back to back in the planned order.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use ollm_ops::DType;
use serde_json::{Map, Value, json};

use crate::{Result, WeightsError};

/// One tensor to be written: its name, element type and shape (slowest-first).
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    pub fn len_bytes(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product::<u64>() * self.dtype.size_bytes() as u64
    }
}

/// Owns the output file while it is written. Data must arrive in the planned order; `finish`
/// checks that every planned byte was written, flushes and syncs.
#[derive(Debug)]
pub struct SafetensorsWriter {
    path: PathBuf,
    out: BufWriter<File>,
    total_data_bytes: u64,
    written_data_bytes: u64,
}

impl SafetensorsWriter {
    /// Creates `path` and writes the header for `tensors`, whose data will follow in this order.
    pub fn create(path: &Path, tensors: &[PlannedTensor]) -> Result<Self> {
        let mut header = Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0u64;
        for t in tensors {
            let end = offset + t.len_bytes();
            let entry = json!({"dtype": t.dtype.safetensors_name(), "shape": t.shape, "data_offsets": [offset, end]});
            if header.insert(t.name.clone(), entry).is_some() || t.name == "__metadata__" {
                return Err(WeightsError::Format {
                    path: path.to_path_buf(),
                    detail: format!("tensor name '{}' is planned twice", t.name),
                });
            }
            offset = end;
        }
        let mut json = serde_json::to_vec(&Value::Object(header)).map_err(|e| WeightsError::Format {
            path: path.to_path_buf(),
            detail: format!("header does not serialise: {e}"),
        })?;
        json.resize(json.len().next_multiple_of(8), b' ');

        let err = |source| WeightsError::Write { path: path.to_path_buf(), source };
        let mut out = BufWriter::with_capacity(8 << 20, File::create(path).map_err(err)?);
        out.write_all(&(json.len() as u64).to_le_bytes()).map_err(err)?;
        out.write_all(&json).map_err(err)?;
        Ok(Self { path: path.to_path_buf(), out, total_data_bytes: offset, written_data_bytes: 0 })
    }

    /// Appends data bytes (the next part of the current tensor, or the next tensors).
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let end = self.written_data_bytes + bytes.len() as u64;
        if end > self.total_data_bytes {
            return Err(WeightsError::Format {
                path: self.path.clone(),
                detail: format!("{end} data bytes written, more than the {} planned", self.total_data_bytes),
            });
        }
        self.out.write_all(bytes).map_err(|source| WeightsError::Write { path: self.path.clone(), source })?;
        self.written_data_bytes = end;
        Ok(())
    }

    /// Checks the data is complete, then flushes and syncs the file to disk.
    pub fn finish(self) -> Result<()> {
        if self.written_data_bytes != self.total_data_bytes {
            return Err(WeightsError::Format {
                path: self.path.clone(),
                detail: format!(
                    "only {} of {} planned data bytes were written",
                    self.written_data_bytes, self.total_data_bytes
                ),
            });
        }
        let path = self.path.clone();
        let err = |source| WeightsError::Write { path: path.clone(), source };
        let file = self.out.into_inner().map_err(|e| err(e.into_error()))?;
        file.sync_all().map_err(err)
    }
}

impl SafetensorsWriter {
    /// Ends the file at its planned length without writing the data: a sparse hole that reads
    /// back as zeros (a header-only model, for planning). Nothing may have been written.
    pub fn finish_hole(self) -> Result<()> {
        if self.written_data_bytes != 0 {
            return Err(WeightsError::Format {
                path: self.path.clone(),
                detail: "a header-only file got data bytes".into(),
            });
        }
        let path = self.path.clone();
        let err = |source| WeightsError::Write { path: path.clone(), source };
        let file = self.out.into_inner().map_err(|e| err(e.into_error()))?;
        let header = file.metadata().map_err(err)?.len();
        file.set_len(header + self.total_data_bytes).map_err(err)?;
        file.sync_all().map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Catalog;

    #[test]
    fn written_file_reads_back_through_the_catalog() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.safetensors");
        let plan = vec![
            PlannedTensor { name: "b".into(), dtype: DType::BF16, shape: vec![2, 3] },
            PlannedTensor { name: "a".into(), dtype: DType::F32, shape: vec![1] },
        ];
        let mut w = SafetensorsWriter::create(&path, &plan).expect("create");
        let b: Vec<u8> = (0u8..12).collect();
        w.write(&b[..5]).expect("part 1");
        w.write(&b[5..]).expect("part 2");
        w.write(&2.5f32.to_le_bytes()).expect("a");
        assert!(w.write(&[0]).is_err(), "past the plan");
        w.finish().expect("finish");

        let cat = Catalog::open_dir(dir.path()).expect("catalog");
        let tb = cat.read(cat.get("b").expect("b")).expect("read b");
        assert_eq!((tb.dtype, tb.shape.clone(), tb.bytes), (DType::BF16, vec![2, 3], b));
        assert_eq!(cat.read(cat.get("a").expect("a")).expect("read a").bytes, 2.5f32.to_le_bytes());
    }

    #[test]
    fn incomplete_data_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.safetensors");
        let plan = vec![PlannedTensor { name: "t".into(), dtype: DType::F16, shape: vec![4] }];
        let mut w = SafetensorsWriter::create(&path, &plan).expect("create");
        w.write(&[0; 6]).expect("part");
        assert!(w.finish().expect_err("short").to_string().contains("6 of 8"));
    }
}
