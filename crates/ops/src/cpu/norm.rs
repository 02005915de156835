//! RMSNorm (docs/models.md §1.1), plain and gated, computed in f32.

use rayon::prelude::*;

use super::elementwise::silu;
use crate::NormKind;

/// `rsqrt(mean(x²) + eps)` of one row.
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}

/// For every row of x (length n = w.len()): `out = w' ⊙ x · rsqrt(mean(x²) + eps)` with
/// `w' = 1 + w` for zero-centred norms and `w' = w` otherwise. In f32 the Llama and GPT-OSS
/// variants coincide; they differ only in bf16 rounding.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, kind: NormKind, out: &mut [f32]) {
    let n = w.len();
    let offset = if kind == NormKind::ZeroCentered { 1.0 } else { 0.0 };
    out.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, xr)| {
        let r = inv_rms(xr, eps);
        for ((o, xv), wv) in o.iter_mut().zip(xr).zip(w) {
            *o = (offset + wv) * (xv * r);
        }
    });
}

/// Qwen3-Next gated RMSNorm (Gated-RMS): for every row of x and z (length n = w.len()),
/// `out = (w ⊙ (x · rsqrt(mean(x²) + eps))) ⊙ silu(z)`, in HF's order of operations. Plain w
/// (no 1 +).
pub fn gated_rms_norm(x: &[f32], z: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    out.par_chunks_mut(n).zip(x.par_chunks(n)).zip(z.par_chunks(n)).for_each(|((o, xr), zr)| {
        let r = inv_rms(xr, eps);
        for (((o, xv), zv), wv) in o.iter_mut().zip(xr).zip(zr).zip(w) {
            *o = wv * (xv * r) * silu(*zv);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_weight_gives_unit_rms() {
        let x = [3.0f32, -4.0, 0.5, 2.0];
        let mut out = [0.0; 4];
        rms_norm(&x, &[1.0; 4], 0.0, NormKind::Llama, &mut out);
        let ms: f32 = out.iter().map(|v| v * v).sum::<f32>() / 4.0;
        assert!((ms - 1.0).abs() < 1e-6, "mean square {ms}");
        // Zero-centred: a stored weight of 0 means a scale of 1.
        let mut zc = [0.0; 4];
        rms_norm(&x, &[0.0; 4], 0.0, NormKind::ZeroCentered, &mut zc);
        assert_eq!(out, zc);
    }

    #[test]
    fn gated_rms_norm_by_hand() {
        // Row 0: x = [2, -2, 2, -2] has mean(x²) = 4, so r(x) = [1, -1, 1, -1] (eps 0).
        // silu(ln 3) = ln 3 · 3/4, silu(-ln 3) = -ln 3 · 1/4, silu(0) = 0.
        // Row 1 (eps 0.75): x = [3, 0, 0, -4] has mean(x²) = 25/4, so r(x) = x / √(25/4 + 3/4) = x / √7.
        let ln3 = 3f32.ln();
        let x = [2.0, -2.0, 2.0, -2.0, 3.0, 0.0, 0.0, -4.0];
        let z = [0.0, ln3, -ln3, ln3, ln3, 5.0, -5.0, -ln3];
        let w = [1.0, 2.0, 3.0, -4.0];
        let mut out = [f32::NAN; 8];
        gated_rms_norm(&x[..4], &z[..4], &w, 0.0, &mut out[..4]);
        gated_rms_norm(&x[4..], &z[4..], &w, 0.75, &mut out[4..]);
        let r1 = 1.0 / 7f32.sqrt();
        let normed = [1.0, -1.0, 1.0, -1.0, 3.0 * r1, 0.0, 0.0, -4.0 * r1];
        let s5 = 5.0 / (1.0 + (-5.0f32).exp()); // silu(±5) meets x = 0: no output either way
        let silu_z = [0.0, ln3 * 0.75, -ln3 * 0.25, ln3 * 0.75, ln3 * 0.75, s5, s5 - 5.0, -ln3 * 0.25];
        let want: Vec<f32> = (0..8).map(|i| w[i % 4] * normed[i] * silu_z[i]).collect();
        for (g, w) in out.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{out:?} vs {want:?}");
        }
    }
}
