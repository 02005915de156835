//! Causal attention with GQA, an optional sliding window and optional per-head sinks, in f32.
//!
//! One task per (query token, head): scores over the visible keys, a max-subtracted softmax
//! (the sink logit joins the normaliser only), then the weighted sum of values.

use rayon::prelude::*;

pub use crate::backend::AttnGeometry as Geometry;

/// q, out `[T, n_heads, d]`; k, v `[n_kv, cap, d]`. Query t sits at position `pos0 + t` and sees
/// keys `j` with `j <= pos0 + t` and, with a window W, `j > pos0 + t - W`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    g: &Geometry,
    scale: f32,
    window: Option<usize>,
    sinks: Option<&[f32]>,
    out: &mut [f32],
) {
    let (d, group) = (g.d, g.n_heads / g.n_kv);
    out.par_chunks_mut(d).enumerate().for_each_init(Vec::new, |scores: &mut Vec<f32>, (idx, o)| {
        let (t, h) = (idx / g.n_heads, idx % g.n_heads);
        let kv_head = h / group;
        let p = g.pos0 + t;
        let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
        let qv = &q[idx * d..][..d];
        let kbase = &k[kv_head * g.cap * d..];
        let vbase = &v[kv_head * g.cap * d..];

        scores.clear();
        scores.extend((lo..=p).map(|j| dot(qv, &kbase[j * d..][..d]) * scale));
        let sink = sinks.map(|s| s[h]);
        let max = scores.iter().copied().fold(sink.unwrap_or(f32::NEG_INFINITY), f32::max);
        let mut denom = sink.map_or(0.0, |z| (z - max).exp());
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            denom += *s;
        }
        o.fill(0.0);
        for (j, &e) in (lo..=p).zip(scores.iter()) {
            let w = e / denom;
            for (ov, vv) in o.iter_mut().zip(&vbase[j * d..][..d]) {
                *ov += w * vv;
            }
        }
    });
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With one visible key the output is that key's value; a sink only shrinks it.
    #[test]
    fn first_position_returns_its_value_and_sink_scales_it() {
        let g = Geometry { n_heads: 2, n_kv: 1, d: 2, cap: 4, pos0: 0 };
        let q = [1.0, 2.0, -1.0, 0.5];
        let k = [0.3, 0.7, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let v = [5.0, -3.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0];
        let mut out = [0.0; 4];
        attention(&q, &k, &v, &g, 0.5, None, None, &mut out);
        assert_eq!(out, [5.0, -3.0, 5.0, -3.0]);
        // Sink z with the single score s: weight = e^s / (e^s + e^z).
        let s = (1.0 * 0.3 + 2.0 * 0.7) * 0.5f32;
        attention(&q, &k, &v, &g, 0.5, None, Some(&[s, -1e9]), &mut out);
        assert!((out[0] - 2.5).abs() < 1e-6 && (out[1] + 1.5).abs() < 1e-6, "{out:?}");
        assert!((out[2] - 5.0).abs() < 1e-6, "{out:?}");
    }

    /// A window of 1 sees only the current token.
    #[test]
    fn window_of_one_sees_only_itself() {
        let g = Geometry { n_heads: 1, n_kv: 1, d: 1, cap: 3, pos0: 0 };
        let (q, k, v) = ([1.0, 1.0, 1.0], [1.0, 2.0, 3.0], [10.0, 20.0, 30.0]);
        let mut out = [0.0; 3];
        attention(&q, &k, &v, &g, 1.0, Some(1), None, &mut out);
        assert_eq!(out, [10.0, 20.0, 30.0]);
    }
}
