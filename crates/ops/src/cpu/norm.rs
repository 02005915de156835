//! RMSNorm (models.md §1.1), computed in f32.

use rayon::prelude::*;

use crate::NormKind;

/// For every row of x (length n = w.len()): `out = w' ⊙ x · rsqrt(mean(x²) + eps)` with
/// `w' = 1 + w` for zero-centred norms and `w' = w` otherwise. In f32 the Llama and GPT-OSS
/// variants coincide; they differ only in bf16 rounding.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, kind: NormKind, out: &mut [f32]) {
    let n = w.len();
    let offset = if kind == NormKind::ZeroCentered { 1.0 } else { 0.0 };
    out.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, xr)| {
        let ss: f32 = xr.iter().map(|v| v * v).sum();
        let r = 1.0 / (ss / n as f32 + eps).sqrt();
        for ((o, xv), wv) in o.iter_mut().zip(xr).zip(w) {
            *o = (offset + wv) * (xv * r);
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
}
