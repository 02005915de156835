//! Mixture-of-experts helpers: the GPT-OSS clamped SwiGLU and the router top-k of both MoE
//! families (docs/models.md §3.3, §4.6), computed in f32.

use rayon::prelude::*;

use crate::RouterMode;

/// GPT-OSS clamped SwiGLU for rows of gate_up `[2I]` (gate = even columns, up = odd columns)
/// into rows of out `[I]`, `inter` = I:
/// `g = min(gate, limit)`, `u = clamp(up, -limit, limit)`, `out = (u + 1) ⊙ (g ⊙ σ(alpha·g))`.
/// The clamps are written as comparisons, so a NaN passes through (as in torch.clamp) and no
/// limit can make them panic.
pub fn clamped_swiglu(gate_up: &[f32], inter: usize, limit: f32, alpha: f32, out: &mut [f32]) {
    out.par_chunks_mut(inter).zip(gate_up.par_chunks(2 * inter)).for_each(|(o, gu)| {
        for (o, pair) in o.iter_mut().zip(gu.chunks_exact(2)) {
            let g = if pair[0] > limit { limit } else { pair[0] };
            let u = if pair[1] > limit {
                limit
            } else if pair[1] < -limit {
                -limit
            } else {
                pair[1]
            };
            let glu = g / (1.0 + (-alpha * g).exp());
            *o = (u + 1.0) * glu;
        }
    });
}

/// The value experts are ranked by: the logit, with NaN ranked as -inf (below every number, tied
/// with -inf and so broken by index), which makes the order total.
#[inline]
fn rank_key(v: f32) -> f32 {
    if v.is_nan() { f32::NEG_INFINITY } else { v }
}

/// Whether expert (a, ia) comes before (b, ib): the larger key, then the lower index.
#[inline]
fn beats(a: f32, ia: usize, b: f32, ib: usize) -> bool {
    a > b || (a == b && ia < ib)
}

/// Router top-k of logits `[T, E]` (e = E) into ids and weights `[T, k]`, `1 <= k <= E`
/// (checked by the caller). The experts are the k largest logits, sorted descending, ties to
/// the lower index. Softmax is monotonic, so they are also the k largest probabilities;
/// comparing the logits rather than rounded probabilities keeps the choice bit-identical on
/// every backend. The weights follow `mode`:
/// * [`RouterMode::SoftmaxOfTopK`]: `w_j = exp(l_j − l_0) / Σ_j' exp(l_j' − l_0)` (l_0 is the largest);
/// * [`RouterMode::TopKOfSoftmax`]: `p_j = exp(l_j − m) / Σ_e exp(l_e − m)` with m the row
///   max, then `p_j / Σ_j' p_j'` if `norm_topk_prob`.
///
/// The CUDA kernel (`kernels/moe.cu`) does the same steps in the same order; only its sum
/// over all E (a warp reduction) is ordered differently.
pub fn router_topk(logits: &[f32], e: usize, k: usize, mode: RouterMode, ids: &mut [u32], weights: &mut [f32]) {
    ids.par_chunks_mut(k).zip(weights.par_chunks_mut(k)).zip(logits.par_chunks(e)).for_each(|((ids, w), row)| {
        route_token(row, mode, ids, w);
    });
}

/// One token: k = ids.len() rounds of argmax over the experts not yet chosen.
fn route_token(row: &[f32], mode: RouterMode, ids: &mut [u32], weights: &mut [f32]) {
    let mut chosen = vec![false; row.len()];
    for (id, w) in ids.iter_mut().zip(weights.iter_mut()) {
        let mut best: Option<(f32, usize)> = None;
        for (j, &v) in row.iter().enumerate() {
            if !chosen[j] && best.is_none_or(|(bv, bj)| beats(rank_key(v), j, bv, bj)) {
                best = Some((rank_key(v), j));
            }
        }
        // k <= E, so some expert is always left; the fallback is never taken.
        let j = best.map_or(0, |(_, j)| j);
        chosen[j] = true;
        *id = j as u32;
        *w = row[j];
    }
    // `weights` holds the chosen logits, largest first.
    match mode {
        RouterMode::SoftmaxOfTopK => {
            let m = weights[0];
            let mut sum = 0.0f32;
            for w in weights.iter_mut() {
                *w = (*w - m).exp();
                sum += *w;
            }
            for w in weights.iter_mut() {
                *w /= sum;
            }
        }
        RouterMode::TopKOfSoftmax { norm_topk_prob } => {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let total: f32 = row.iter().map(|v| (v - m).exp()).sum();
            for w in weights.iter_mut() {
                *w = (*w - m).exp() / total;
            }
            if norm_topk_prob {
                let sum: f32 = weights.iter().sum();
                for w in weights.iter_mut() {
                    *w /= sum;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: &[f32], want: &[f32], tol: f32) -> bool {
        got.len() == want.len() && got.iter().zip(want).all(|(a, b)| (a - b).abs() <= tol * b.abs().max(1.0))
    }

    #[test]
    fn clamped_swiglu_by_hand() {
        // alpha = ln 3 makes σ(alpha·g) = 3^g / (1 + 3^g): 3/4 at g = 1, 1/4 at g = -1.
        let ln3 = 3f32.ln();
        #[rustfmt::skip]
        let gate_up = [
            // (gate, up) pairs of token 0
            1.0, 1.0,     // (1 + 1) · 1 · 3/4                       = 1.5
            10.0, 20.0,   // gate → 7, up → 7: 8 · 7 · 3^7/(1 + 3^7) = 56 · 2187/2188
            -1.0, -20.0,  // up → -7: (-7 + 1) · (-1) · 1/4          = 1.5
            0.0, 5.0,     // gate 0                                   = 0
            // token 1
            -10.0, 0.0,   // no lower clamp on gate: 1 · (-10) / (1 + 3^10)
            2.0, -0.5,    // 0.5 · 2 · 9/10                          = 0.9
            7.5, -7.5,    // gate → 7, up → -7: -6 · 7 · 2187/2188
            -3.0, 3.0,    // 4 · (-3) · 1/28                         = -3/7
        ];
        let mut out = [f32::NAN; 8];
        clamped_swiglu(&gate_up, 4, 7.0, ln3, &mut out);
        let want = [1.5, 56.0 * 2187.0 / 2188.0, 1.5, 0.0, -10.0 / 59050.0, 0.9, -42.0 * 2187.0 / 2188.0, -3.0 / 7.0];
        assert!(close(&out, &want, 1e-6), "{out:?} vs {want:?}");
        // A smaller limit clamps more: limit 1 turns (10, 20) into (1, 1) → 1.5.
        let mut one = [f32::NAN; 1];
        clamped_swiglu(&[10.0, 20.0], 1, 1.0, ln3, &mut one);
        assert!(close(&one, &[1.5], 1e-6), "{one:?}");
    }

    fn route(logits: &[f32], e: usize, k: usize, mode: RouterMode) -> (Vec<u32>, Vec<f32>) {
        let t = logits.len() / e;
        let (mut ids, mut w) = (vec![u32::MAX; t * k], vec![f32::NAN; t * k]);
        router_topk(logits, e, k, mode, &mut ids, &mut w);
        (ids, w)
    }

    #[test]
    fn router_modes_by_hand() {
        // Token 0: logits [1, 3, 2, 0] → experts 1, 2. Token 1: an exact tie between 2 and 3.
        let logits = [1.0, 3.0, 2.0, 0.0, 0.5, -1.0, 4.0, 4.0];
        let e = std::f32::consts::E;
        let pair = [e / (1.0 + e), 1.0 / (1.0 + e)]; // softmax([3, 2])

        let (ids, w) = route(&logits, 4, 2, RouterMode::SoftmaxOfTopK);
        assert_eq!(ids, [1, 2, 2, 3]);
        assert!(close(&w, &[pair[0], pair[1], 0.5, 0.5], 1e-6), "{w:?}");

        // Over all four: Σ exp = 1 + e + e² + e³ for token 0; e^0.5 + e^-1 + 2e^4 for token 1.
        let z0 = 1.0 + e + e * e + e * e * e;
        let z1 = 0.5f32.exp() + (-1.0f32).exp() + 2.0 * 4.0f32.exp();
        let p1 = 4.0f32.exp() / z1;
        let (ids, w) = route(&logits, 4, 2, RouterMode::TopKOfSoftmax { norm_topk_prob: false });
        assert_eq!(ids, [1, 2, 2, 3]);
        assert!(close(&w, &[e * e * e / z0, e * e / z0, p1, p1], 1e-6), "{w:?}");

        // Renormalised, the two chosen of token 0 give softmax([3, 2]) again.
        let (ids, w) = route(&logits, 4, 2, RouterMode::TopKOfSoftmax { norm_topk_prob: true });
        assert_eq!(ids, [1, 2, 2, 3]);
        assert!(close(&w, &[pair[0], pair[1], 0.5, 0.5], 1e-6), "{w:?}");
    }

    #[test]
    fn router_ties_go_to_the_lower_index() {
        // torch.topk([1, 2, 2, 2], 2) may return [1, 3]; the engine returns [1, 2] (docs/models.md §6.4).
        let (ids, w) = route(&[1.0, 2.0, 2.0, 2.0], 4, 2, RouterMode::SoftmaxOfTopK);
        assert_eq!(ids, [1, 2]);
        assert_eq!(w, [0.5, 0.5]);
        let (ids, _) = route(&[5.0; 6], 6, 4, RouterMode::TopKOfSoftmax { norm_topk_prob: true });
        assert_eq!(ids, [0, 1, 2, 3]);
        // All E chosen: every expert once, in descending order.
        let (ids, w) = route(&[0.0, 2.0, -1.0, 2.0, 1.0], 5, 5, RouterMode::SoftmaxOfTopK);
        assert_eq!(ids, [1, 3, 4, 0, 2]);
        assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn router_never_prefers_nan_or_minus_infinity() {
        let logits = [f32::NAN, f32::NEG_INFINITY, 1.0, 0.0];
        let (ids, w) = route(&logits, 4, 3, RouterMode::SoftmaxOfTopK);
        // NaN ranks as -inf and so after it, by index: 2, 3, then 0 (the lower of the two).
        assert_eq!(ids, [2, 3, 0]);
        assert!(w.iter().all(|v| v.is_nan()), "a chosen NaN logit shows in the weights: {w:?}");
    }
}
