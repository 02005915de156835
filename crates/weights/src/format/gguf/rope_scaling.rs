//! Recovering HF's `llama3` rope scaling from a GGUF `rope_freqs.weight` (docs/models.md §7.1, §1.2).
//!
//! The converter stores `ρ_i = inv_i / inv'_i` per rotary pair: 1 in the high-frequency band,
//! `factor` in the low band, and `1/((1−s)/factor + s)` between, with
//! `s = (L0/λ_i − lo)/(hi − lo)` and `λ_i = 2π/inv_i`. So `s` is linear in `1/λ_i`, and a
//! least-squares line through the mid-band points gives `lo/L0` and `hi/L0`. Only those ratios
//! (and the factor) change the frequencies, so `L0` itself cannot be recovered: the importer
//! passes `rope.scaling.original_context_length` when the file has it, else Llama-3's 8192, and
//! the fit is then checked to reproduce every `ρ_i`.

use std::f64::consts::PI;

/// HF's `rope_scaling` for `rope_type: llama3`.
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: u64,
}

/// Relative tolerance for "this ρ reproduces the stored one".
pub const FIT_TOLERANCE: f64 = 1e-4;
/// Band membership: ρ within this relative distance of 1 (or of the factor).
const BAND_TOLERANCE: f64 = 1e-5;

/// `inv_i = θ^(−2i/d)` for i < d/2.
fn inv_freqs(theta: f64, head_dim: usize) -> Vec<f64> {
    (0..head_dim / 2).map(|i| theta.powf(-(2.0 * i as f64) / head_dim as f64)).collect()
}

/// The ρ_i that HF's llama3 rule gives (inv_i / inv'_i).
pub fn llama3_ratios(theta: f64, head_dim: usize, s: &Llama3Scaling) -> Vec<f64> {
    let l0 = s.original_max_position_embeddings as f64;
    let (low_wavelen, high_wavelen) = (l0 / s.low_freq_factor, l0 / s.high_freq_factor);
    inv_freqs(theta, head_dim)
        .into_iter()
        .map(|inv| {
            let wavelen = 2.0 * PI / inv;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                s.factor
            } else {
                let smooth = (l0 / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                1.0 / ((1.0 - smooth) / s.factor + smooth)
            }
        })
        .collect()
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(a.abs())
}

fn reproduces(rho: &[f64], theta: f64, head_dim: usize, s: &Llama3Scaling) -> bool {
    llama3_ratios(theta, head_dim, s).iter().zip(rho).all(|(&fit, &want)| close(fit, want, FIT_TOLERANCE))
}

/// Rounds to 3 decimals when that still reproduces the data (1.0000001 → 1).
fn tidy(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Fits llama3 scaling to `rho` (length head_dim/2). `Ok(None)`: every ρ is 1, no scaling.
/// The error says why the values are not llama3 scaling.
pub fn fit_llama3(
    rho: &[f32],
    theta: f64,
    head_dim: usize,
    original_ctx: u64,
) -> Result<Option<Llama3Scaling>, String> {
    if rho.len() != head_dim / 2 {
        return Err(format!("has {} values, but head_dim {head_dim} needs {}", rho.len(), head_dim / 2));
    }
    let rho: Vec<f64> = rho.iter().map(|&r| f64::from(r)).collect();
    if let Some(bad) = rho.iter().find(|r| !r.is_finite() || **r < 1.0 - BAND_TOLERANCE) {
        return Err(format!("contains {bad}; llama3 scaling only divides frequencies by factors >= 1"));
    }
    let factor = rho.iter().copied().fold(1.0, f64::max);
    if close(factor, 1.0, BAND_TOLERANCE) {
        return Ok(None);
    }
    // Mid-band points: s_i = (1/ρ_i − 1/f)/(1 − 1/f) against x_i = 1/λ_i = inv_i/(2π).
    let points: Vec<(f64, f64)> = inv_freqs(theta, head_dim)
        .into_iter()
        .zip(&rho)
        .filter(|&(_, &r)| !close(r, 1.0, BAND_TOLERANCE) && !close(r, factor, BAND_TOLERANCE))
        .map(|(inv, &r)| (inv / (2.0 * PI), (1.0 / r - 1.0 / factor) / (1.0 - 1.0 / factor)))
        .collect();
    let l0 = original_ctx as f64;
    let candidate = if points.len() >= 2 {
        // s = a·x + b, with a = L0/(hi − lo) and b = −lo/(hi − lo).
        let n = points.len() as f64;
        let (mx, ms) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
        let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
        let sxs: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - ms)).sum();
        let a = sxs / sxx;
        let b = ms - a * mx;
        Llama3Scaling {
            factor,
            low_freq_factor: -b * l0 / a,
            high_freq_factor: (1.0 - b) * l0 / a,
            original_max_position_embeddings: original_ctx,
        }
    } else {
        // Too few blended pairs to fit a line: try Llama-3's own band factors.
        Llama3Scaling {
            factor,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: original_ctx,
        }
    };
    let tidied = Llama3Scaling {
        factor: tidy(candidate.factor),
        low_freq_factor: tidy(candidate.low_freq_factor),
        high_freq_factor: tidy(candidate.high_freq_factor),
        ..candidate.clone()
    };
    for s in [tidied, candidate] {
        if s.low_freq_factor > 0.0 && s.high_freq_factor > s.low_freq_factor && reproduces(&rho, theta, head_dim, &s) {
            return Ok(Some(s));
        }
    }
    Err(format!(
        "cannot be expressed as llama3 rope scaling (no factor/low_freq_factor/high_freq_factor reproduces every value to {FIT_TOLERANCE} relative; {} blended pairs)",
        points.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_f32(v: &[f64]) -> Vec<f32> {
        v.iter().map(|&x| x as f32).collect()
    }

    #[test]
    fn recovers_llama_3_1_8b() {
        let want = Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let rho = llama3_ratios(500000.0, 128, &want);
        assert!(rho.iter().any(|&r| r > 1.0 && r < 8.0), "the test must cover the mid band");
        assert_eq!(fit_llama3(&as_f32(&rho), 500000.0, 128, 8192), Ok(Some(want)));
    }

    #[test]
    fn recovers_llama_3_2_1b_with_head_dim_64() {
        let want = Llama3Scaling {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let rho = llama3_ratios(500000.0, 64, &want);
        assert_eq!(fit_llama3(&as_f32(&rho), 500000.0, 64, 8192), Ok(Some(want)));
    }

    #[test]
    fn recovers_unusual_band_factors() {
        let want = Llama3Scaling {
            factor: 16.0,
            low_freq_factor: 2.0,
            high_freq_factor: 8.0,
            original_max_position_embeddings: 8192,
        };
        let rho = llama3_ratios(500000.0, 128, &want);
        assert_eq!(fit_llama3(&as_f32(&rho), 500000.0, 128, 8192), Ok(Some(want)));
    }

    #[test]
    fn all_ones_is_no_scaling() {
        assert_eq!(fit_llama3(&[1.0; 64], 10000.0, 128, 8192), Ok(None));
    }

    #[test]
    fn other_shapes_are_rejected() {
        // Linear scaling (every ρ = 4) has no high band: llama3 cannot express it.
        let err = fit_llama3(&[4.0; 64], 500000.0, 128, 8192).expect_err("linear");
        assert!(err.contains("cannot be expressed"), "{err}");
        // A noisy mid band.
        let s = Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let mut rho = as_f32(&llama3_ratios(500000.0, 128, &s));
        let mid = rho.iter().position(|&r| r > 1.5 && r < 7.0).expect("mid");
        rho[mid] *= 1.01;
        assert!(fit_llama3(&rho, 500000.0, 128, 8192).is_err());
        assert!(fit_llama3(&[0.5; 64], 500000.0, 128, 8192).expect_err("below 1").contains("0.5"));
        assert!(fit_llama3(&[1.0; 3], 500000.0, 128, 8192).expect_err("length").contains("needs 64"));
    }
}
