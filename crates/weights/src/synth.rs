//! Random-weight checkpoints (`ollm synth`): planned tensors filled with seeded pseudo-random
//! values, generated in parallel chunks and written as they are made, so a 16 GB model never sits
//! in RAM. The same seed gives the same bytes on any machine.

use std::path::Path;

use half::bf16;
use ollm_ops::DType;
use rayon::prelude::*;
use serde_json::{Map, Value, json};

use crate::format::safetensors_writer::{PlannedTensor, SafetensorsWriter};
use crate::staging::write_json;
use crate::{Result, WeightsError};

/// How one tensor is filled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Every element equal (norm weights: 1.0).
    Const(f32),
    /// Uniform in [-a, a).
    Uniform(f32),
    /// U8 tensors (packed MXFP4): every byte equal (scales).
    Byte(u8),
    /// U8 tensors: uniformly random bytes (blocks of random FP4 codes).
    RandomBytes,
}

impl Init {
    /// The dtype this fill writes.
    fn dtype(self) -> DType {
        match self {
            Init::Const(_) | Init::Uniform(_) => DType::BF16,
            Init::Byte(_) | Init::RandomBytes => DType::U8,
        }
    }
}

/// One tensor to synthesise (bf16 values or u8 packed bytes, as its [`Init`] says).
#[derive(Debug, Clone)]
pub struct SynthTensor {
    pub planned: PlannedTensor,
    pub init: Init,
}

/// Elements generated per parallel work item (32 MiB of bf16).
const CHUNK_ELEMS: usize = 16 << 20;

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The bytes of elements `start..start + len` of tensor number `tensor` under `init`.
fn chunk_bytes(seed: u64, tensor: usize, start: usize, len: usize, init: Init) -> Vec<u8> {
    let mut out = Vec::with_capacity(len * 2);
    let mut state = seed ^ (tensor as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ (start as u64).rotate_left(32);
    match init {
        Init::Byte(b) => out.resize(len, b),
        Init::RandomBytes => {
            while out.len() < len {
                let r = splitmix(&mut state).to_le_bytes();
                out.extend_from_slice(&r[..(len - out.len()).min(8)]);
            }
        }
        Init::Const(v) => {
            let b = bf16::from_f32(v).to_le_bytes();
            for _ in 0..len {
                out.extend_from_slice(&b);
            }
        }
        Init::Uniform(a) => {
            let step = 2.0 * a / 65536.0;
            let mut left = len;
            while left > 0 {
                let r = splitmix(&mut state);
                for j in 0..left.min(4) {
                    let bits = ((r >> (16 * j)) & 0xffff) as f32;
                    out.extend_from_slice(&bf16::from_f32(bits * step - a).to_le_bytes());
                }
                left = left.saturating_sub(4);
            }
        }
    }
    out
}

/// The file name of shard `i` of `n` (`model.safetensors` when there is one).
pub fn shard_name(i: usize, n: usize) -> String {
    if n == 1 { "model.safetensors".into() } else { format!("model-{:05}-of-{n:05}.safetensors", i + 1) }
}

/// Writes `shards` into `dir` (one safetensors file each, plus `model.safetensors.index.json`
/// when there are several). `progress(done, total)` gets data bytes written so far.
pub fn write_shards(
    dir: &Path,
    shards: &[Vec<SynthTensor>],
    seed: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    write_shards_as(dir, shards, Some(seed), progress)
}

/// Like [`write_shards`]; `seed` None writes the headers only, each file's data a sparse hole
/// (zeros when read): a model to plan with, not to run.
pub fn write_shards_as(
    dir: &Path,
    shards: &[Vec<SynthTensor>],
    seed: Option<u64>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let all = shards.iter().flatten();
    if let Some(t) = all.clone().find(|t| t.planned.dtype != t.init.dtype()) {
        return Err(WeightsError::Format {
            path: dir.to_path_buf(),
            detail: format!(
                "synthesis writes bf16 values or u8 bytes; tensor '{}' is {} with a {} fill",
                t.planned.name,
                t.planned.dtype,
                t.init.dtype()
            ),
        });
    }
    let total: u64 = all.map(|t| t.planned.len_bytes()).sum();
    let mut done = 0u64;
    let mut weight_map = Map::new();
    let workers = rayon::current_num_threads().max(1);
    let mut index = 0usize;
    for (i, shard) in shards.iter().enumerate() {
        let name = shard_name(i, shards.len());
        let path = dir.join(&name);
        let planned: Vec<PlannedTensor> = shard.iter().map(|t| t.planned.clone()).collect();
        let mut writer = SafetensorsWriter::create(&path, &planned)?;
        let Some(seed) = seed else {
            for t in shard {
                weight_map.insert(t.planned.name.clone(), json!(name));
            }
            writer.finish_hole()?;
            continue;
        };
        for t in shard {
            weight_map.insert(t.planned.name.clone(), json!(name));
            let n = (t.planned.len_bytes() / t.planned.dtype.size_bytes() as u64) as usize;
            let starts: Vec<usize> = (0..n).step_by(CHUNK_ELEMS).collect();
            // A batch of chunks per round: generated in parallel, written in order.
            for batch in starts.chunks(workers) {
                let parts: Vec<Vec<u8>> =
                    batch.par_iter().map(|&s| chunk_bytes(seed, index, s, CHUNK_ELEMS.min(n - s), t.init)).collect();
                for p in parts {
                    writer.write(&p)?;
                    done += p.len() as u64;
                    progress(done, total);
                }
            }
            index += 1;
        }
        writer.finish()?;
    }
    if shards.len() > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": Value::Object(weight_map)});
        write_json(&dir.join("model.safetensors.index.json"), &index)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Catalog;

    fn tensor(name: &str, shape: Vec<usize>, init: Init) -> SynthTensor {
        SynthTensor { planned: PlannedTensor { name: name.into(), dtype: DType::BF16, shape }, init }
    }

    #[test]
    fn shards_read_back_with_the_planned_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shards = vec![
            vec![tensor("a", vec![3, 5], Init::Uniform(0.5)), tensor("n", vec![7], Init::Const(1.0))],
            vec![tensor("b", vec![CHUNK_ELEMS / 1024 + 3, 1024], Init::Uniform(0.02))],
        ];
        let mut calls = 0;
        write_shards(dir.path(), &shards, 7, &mut |done, total| {
            calls += 1;
            assert!(done <= total);
        })
        .expect("write");
        assert!(calls >= 3);
        let cat = Catalog::open_dir(dir.path()).expect("catalog");
        let read = |name: &str| -> Vec<f32> {
            let host = cat.read(cat.get(name).expect(name)).expect("read");
            host.to_f32_vec().expect("f32")
        };
        assert_eq!(read("n"), vec![1.0; 7]);
        let a = read("a");
        assert!(a.iter().all(|v| (-0.5..0.5).contains(v)), "{a:?}");
        let b = read("b");
        assert_eq!(b.len(), (CHUNK_ELEMS / 1024 + 3) * 1024);
        // Spread like a uniform: mean near 0, variance near a²/3; chunks differ from each other.
        let mean = b.iter().map(|&v| v as f64).sum::<f64>() / b.len() as f64;
        let var = b.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / b.len() as f64;
        assert!(mean.abs() < 1e-4, "mean {mean}");
        assert!((var / (0.02f64 * 0.02 / 3.0) - 1.0).abs() < 0.02, "var {var}");
        assert_ne!(&b[..1024], &b[CHUNK_ELEMS..CHUNK_ELEMS + 1024]);
        // Same seed, same bytes.
        assert_eq!(chunk_bytes(7, 2, 0, 100, Init::Uniform(0.02)), chunk_bytes(7, 2, 0, 100, Init::Uniform(0.02)));
        assert_ne!(chunk_bytes(7, 2, 0, 100, Init::Uniform(0.02)), chunk_bytes(8, 2, 0, 100, Init::Uniform(0.02)));
    }

    #[test]
    fn bf16_values_and_u8_bytes_are_synthesised() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut t = tensor("x", vec![2], Init::Const(0.0));
        t.planned.dtype = DType::F32;
        let err = write_shards(dir.path(), &[vec![t]], 1, &mut |_, _| {}).expect_err("f32");
        assert!(err.to_string().contains("bf16 values or u8 bytes"), "{err}");
        // Packed bytes: constant scales and random blocks read back as written.
        let u8t = |name: &str, init| SynthTensor {
            planned: PlannedTensor { name: name.into(), dtype: DType::U8, shape: vec![3, 37] },
            init,
        };
        write_shards(dir.path(), &[vec![u8t("s", Init::Byte(120)), u8t("b", Init::RandomBytes)]], 1, &mut |_, _| {})
            .expect("u8");
        let cat = Catalog::open_dir(dir.path()).expect("catalog");
        let bytes = |n: &str| cat.read(cat.get(n).expect(n)).expect("read").bytes;
        assert_eq!(bytes("s"), vec![120; 111]);
        let b = bytes("b");
        assert_eq!(b.len(), 111);
        assert!(b.iter().collect::<std::collections::HashSet<_>>().len() > 50, "random bytes");
    }
}
