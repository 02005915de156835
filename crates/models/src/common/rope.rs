//! RoPE frequency tables (docs/models.md §1.2): default, linear, llama3 and yarn scaling.
//!
//! The cos/sin tables are not built for the model's whole context up front (a config may
//! declare 16 Mi positions, 8 GiB of tables at head_dim 128): [`RopeTables`] starts small and
//! grows, by doubling, to the positions a sequence actually reaches.

use std::sync::{Arc, PoisonError, RwLock};

use ollm_ops::{Backend, RopeTable};

use crate::{ModelError, Result};

/// Positions the first table covers (2 MiB of tables at head_dim 128).
const FIRST_TABLE_POSITIONS: usize = 4096;

/// How the base inverse frequencies are rescaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Every inverse frequency divided by `factor` (positions interpolated; Gemma 3's global layers).
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_positions: f64,
    },
    Yarn {
        factor: f64,
        original_max_positions: f64,
        beta_fast: f64,
        beta_slow: f64,
        truncate: bool,
        attention_factor: Option<f64>,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
    },
}

/// Inverse frequencies `inv'[i]`, i < R/2, and the attention factor m that scales cos and sin.
pub fn inv_freq(theta: f64, rotary_dims: usize, scaling: &RopeScaling) -> (Vec<f32>, f32) {
    let r = rotary_dims as f32;
    // torch computes θ ** (f32(2i) / R) in f32.
    let base: Vec<f32> = (0..rotary_dims / 2).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / r)).collect();
    match *scaling {
        RopeScaling::Default => (base, 1.0),
        RopeScaling::Linear { factor } => (base.iter().map(|&inv| inv / factor as f32).collect(), 1.0),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_positions } => {
            let (f, lo, hi, l0) =
                (factor as f32, low_freq_factor as f32, high_freq_factor as f32, original_max_positions as f32);
            let scaled = base
                .iter()
                .map(|&inv| {
                    let wavelen = 2.0 * std::f32::consts::PI / inv;
                    if wavelen < l0 / hi {
                        inv
                    } else if wavelen > l0 / lo {
                        inv / f
                    } else {
                        let s = (l0 / wavelen - lo) / (hi - lo);
                        (1.0 - s) * inv / f + s * inv
                    }
                })
                .collect();
            (scaled, 1.0)
        }
        RopeScaling::Yarn {
            factor,
            original_max_positions,
            beta_fast,
            beta_slow,
            truncate,
            attention_factor,
            mscale,
            mscale_all_dim,
        } => {
            let rd = rotary_dims as f64;
            let corr = |beta: f64| {
                rd * (original_max_positions / (2.0 * std::f64::consts::PI * beta)).ln() / (2.0 * theta.ln())
            };
            let (mut lo, mut hi) = (corr(beta_fast), corr(beta_slow));
            if truncate {
                lo = lo.floor();
                hi = hi.ceil();
            }
            lo = lo.max(0.0);
            hi = hi.min(rd - 1.0);
            if lo == hi {
                hi += 0.001;
            }
            let scaled = base
                .iter()
                .enumerate()
                .map(|(i, &inv)| {
                    let ramp = ((i as f64 - lo) / (hi - lo)).clamp(0.0, 1.0) as f32;
                    (inv / factor as f32) * ramp + inv * (1.0 - ramp)
                })
                .collect();
            let g = |f: f64, ms: f64| if f <= 1.0 { 1.0 } else { 0.1 * ms * f.ln() + 1.0 };
            let m = match (attention_factor, mscale, mscale_all_dim) {
                (Some(a), _, _) => a,
                (None, Some(ms), Some(all)) => g(factor, ms) / g(factor, all),
                _ => g(factor, 1.0),
            };
            (scaled, m as f32)
        }
    }
}

/// cos/sin tables `[positions, R/2]`: `φ = f32(inv'[i] · f32(p))`, times m.
pub fn tables(inv: &[f32], m: f32, positions: usize) -> (Vec<f32>, Vec<f32>) {
    let half = inv.len();
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for &f in inv {
            let phi = f * p as f32;
            cos.push(phi.cos() * m);
            sin.push(phi.sin() * m);
        }
    }
    (cos, sin)
}

/// The RoPE tables of one model on its backend, grown on demand up to the model's context.
/// Owns the inverse frequencies and the current table; a table handed out stays valid (it is
/// shared) after a larger one replaces it.
#[derive(Debug)]
pub struct RopeTables {
    inv: Vec<f32>,
    m: f32,
    rotary_dims: usize,
    max_positions: usize,
    table: RwLock<Arc<RopeTable>>,
}

impl RopeTables {
    /// Tables for `rotary_dims` and up to `max_positions`; the first covers a few thousand positions.
    pub fn new(
        backend: &dyn Backend,
        theta: f64,
        rotary_dims: usize,
        scaling: &RopeScaling,
        max_positions: usize,
    ) -> Result<Self> {
        let (inv, m) = inv_freq(theta, rotary_dims, scaling);
        let first = upload(backend, &inv, m, rotary_dims, FIRST_TABLE_POSITIONS.min(max_positions).max(1))?;
        Ok(Self { inv, m, rotary_dims, max_positions, table: RwLock::new(Arc::new(first)) })
    }

    /// A table covering positions `0..positions`, growing the current one (to the next power of
    /// two, at most the model's context) if it is shorter.
    pub fn covering(&self, backend: &dyn Backend, positions: usize) -> Result<Arc<RopeTable>> {
        if positions > self.max_positions {
            return Err(ModelError::ContextOverflow { needed: positions, max: self.max_positions });
        }
        {
            let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
            if table.max_positions() >= positions {
                return Ok(table.clone());
            }
        }
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        if table.max_positions() < positions {
            let n = positions.next_power_of_two().min(self.max_positions);
            *table = Arc::new(upload(backend, &self.inv, self.m, self.rotary_dims, n)?);
        }
        Ok(table.clone())
    }

    /// Positions the current table covers (it grows as sequences reach further).
    pub fn built_positions(&self) -> usize {
        self.table.read().unwrap_or_else(PoisonError::into_inner).max_positions()
    }
}

fn upload(backend: &dyn Backend, inv: &[f32], m: f32, rotary_dims: usize, positions: usize) -> Result<RopeTable> {
    let (cos, sin) = tables(inv, m, positions);
    let shape = vec![positions, rotary_dims / 2];
    Ok(RopeTable { cos: backend.upload_f32(shape.clone(), &cos)?, sin: backend.upload_f32(shape, &sin)?, rotary_dims })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ollm_ops::Memory;

    /// Llama-3.1-8B (θ=5e5, d=128, f=8, lo=1, hi=4, L0=8192): short wavelengths are kept, long
    /// ones divided by 8, the band between blended.
    #[test]
    fn llama3_bands() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_positions: 8192.0,
        };
        let (base, _) = inv_freq(5e5, 128, &RopeScaling::Default);
        let (inv, m) = inv_freq(5e5, 128, &s);
        assert_eq!(m, 1.0);
        let mut bands = [0; 3];
        for (b, v) in base.iter().zip(&inv) {
            let wl = 2.0 * std::f32::consts::PI / b;
            if wl < 2048.0 {
                assert_eq!(b, v);
                bands[0] += 1;
            } else if wl > 8192.0 {
                assert!((b / 8.0 - v).abs() <= 1e-12 + 1e-6 * v.abs());
                bands[2] += 1;
            } else {
                assert!(v < b && *v > b / 8.0);
                bands[1] += 1;
            }
        }
        assert!(bands.iter().all(|&n| n > 0), "{bands:?}");
    }

    /// GPT-OSS yarn (θ=150000, R=64, f=32, L0=4096, truncate=false): m = 0.1·ln 32 + 1.
    #[test]
    fn yarn_attention_factor() {
        let s = RopeScaling::Yarn {
            factor: 32.0,
            original_max_positions: 4096.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            truncate: false,
            attention_factor: None,
            mscale: None,
            mscale_all_dim: None,
        };
        let (inv, m) = inv_freq(150000.0, 64, &s);
        assert!((m - 1.3465736).abs() < 1e-6, "{m}");
        let (base, _) = inv_freq(150000.0, 64, &RopeScaling::Default);
        assert_eq!(inv[0], base[0]); // below lo = 8.09: unscaled
        assert!((inv[31] - base[31] / 32.0).abs() < 1e-12); // above hi = 17.4: fully scaled
    }

    /// A context of 2^24 positions builds 4096 positions of table; reaching further grows it to
    /// the next power of two, with the same values as a table built whole.
    #[test]
    fn tables_grow_with_the_positions_reached() {
        let be = ollm_ops::cpu::CpuBackend::new();
        let scaling = RopeScaling::Default;
        let t = RopeTables::new(&be, 10000.0, 8, &scaling, 1 << 24).expect("tables");
        assert_eq!(t.built_positions(), FIRST_TABLE_POSITIONS);
        assert_eq!(t.covering(&be, 100).expect("small").max_positions(), FIRST_TABLE_POSITIONS);
        let grown = t.covering(&be, 5000).expect("grows");
        assert_eq!((grown.max_positions(), t.built_positions()), (8192, 8192));
        let (inv, m) = inv_freq(10000.0, 8, &scaling);
        let whole = upload(&be, &inv, m, 8, 8192).expect("whole");
        let host = |x: &ollm_ops::Tensor| be.to_host_f32(x).expect("download");
        assert_eq!(host(&grown.cos), host(&whole.cos));
        assert_eq!(host(&grown.sin), host(&whole.sin));
        let err = t.covering(&be, (1 << 24) + 1).expect_err("past the context");
        assert!(matches!(err, ModelError::ContextOverflow { .. }), "{err}");
        let small = RopeTables::new(&be, 10000.0, 8, &scaling, 10).expect("tables");
        assert_eq!(small.built_positions(), 10);
    }
}
