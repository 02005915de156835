//! Attention of a tree of new tokens over a KV cache ([`TreeMask`]) of f32 or bf16 (widened as
//! read), computed in f32: the CPU twin of
//! `kernels/tree_attention.cu`. One task per (node, head), scores of the visible keys, a
//! softmax (with the head's sink logit as one more key whose value is zero), the weighted sum
//! of values. A tree is small (tens of nodes): this is the plain form, not the flash one.

use rayon::prelude::*;

use super::attention::{Geometry, KvElem};
use crate::TreeMask;

/// q, out `[T, n_heads, d]`; k, v `[n_kv, cap, d]`, the tree's rows at `pos0..pos0 + T`. Node t
/// sits at position `p = pos0 + depth(t)`; it sees cache rows `j < pos0` with `j > p - W` (a
/// window W) and tree rows `pos0 + a` for its ancestors `a` (itself included) with
/// `depth(t) - depth(a) < W`.
#[allow(clippy::too_many_arguments)]
pub fn tree_attention<E: KvElem>(
    q: &[f32],
    k: &[E],
    v: &[E],
    g: &Geometry,
    tree: &TreeMask,
    scale: f32,
    window: Option<usize>,
    sinks: Option<&[f32]>,
    out: &mut [f32],
) {
    let (d, group) = (g.d, g.n_heads / g.n_kv.max(1));
    if d == 0 {
        return;
    }
    let depth = tree.depths();
    out.par_chunks_mut(d).enumerate().for_each_init(Vec::new, |scores: &mut Vec<(usize, f32)>, (idx, o)| {
        let (t, h) = (idx / g.n_heads, idx % g.n_heads);
        let kvh = h / group;
        let p = g.pos0 + depth[t];
        let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
        let qv = &q[idx * d..][..d];
        let kbase = &k[kvh * g.cap * d..];
        let vbase = &v[kvh * g.cap * d..];
        let in_window = |a: usize| window.is_none_or(|w| depth[t] - depth[a] < w);
        let rows = (lo..g.pos0).chain((0..tree.len()).filter(|&a| tree.sees(t, a) && in_window(a)).map(|a| g.pos0 + a));
        scores.clear();
        scores.extend(rows.map(|j| (j, dot(qv, &kbase[j * d..][..d]) * scale)));
        let sink = sinks.map(|s| s[h]);
        let max = scores.iter().map(|s| s.1).fold(sink.unwrap_or(f32::NEG_INFINITY), f32::max);
        let mut denom = sink.map_or(0.0, |z| (z - max).exp());
        for s in scores.iter_mut() {
            s.1 = (s.1 - max).exp();
            denom += s.1;
        }
        o.fill(0.0);
        for &(j, e) in scores.iter() {
            let w = e / denom;
            for (ov, vv) in o.iter_mut().zip(&vbase[j * d..][..d]) {
                *ov += w * vv.widen();
            }
        }
    });
}

fn dot<E: KvElem>(a: &[f32], b: &[E]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y.widen()).sum()
}

#[cfg(test)]
mod tests {
    use super::super::attention::attention;
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1).
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// A chain is causal attention (the flash kernel), with windows and sinks: 2e-5 absolute.
    #[test]
    fn a_chain_is_causal_attention() {
        for &(t, pos0, window, sinks) in &[(5, 0, None, false), (9, 300, Some(7), true), (33, 40, Some(50), false)] {
            let (n_heads, n_kv, d) = (4, 2, 16);
            let cap = pos0 + t + 3;
            let g = Geometry { n_heads, n_kv, d, cap, pos0 };
            let (q, k, v) = (noise(t * n_heads * d, 1), noise(n_kv * cap * d, 2), noise(n_kv * cap * d, 3));
            let sinks = sinks.then(|| noise(n_heads, 4));
            let mut want = vec![f32::NAN; q.len()];
            attention(&q, &k, &v, &g, 0.3, window, sinks.as_deref(), &mut want);
            let mut got = vec![f32::NAN; q.len()];
            tree_attention(&q, &k, &v, &g, &TreeMask::chain(t), 0.3, window, sinks.as_deref(), &mut got);
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst <= 2e-5, "T={t} pos0={pos0} {window:?}: {worst}");
        }
    }

    /// Each node of a branching tree gets what causal attention over its own path gives (the
    /// path's rows copied to consecutive cache rows), windows and sinks included.
    #[test]
    fn each_node_matches_its_path_alone() {
        let tree = TreeMask::new(&[None, Some(0), Some(1), Some(0), Some(3), Some(4), Some(4), None]).expect("tree");
        let (t, n_heads, n_kv, d, pos0) = (tree.len(), 2, 1, 8, 20);
        for window in [None, Some(3), Some(22)] {
            let cap = pos0 + t;
            let g = Geometry { n_heads, n_kv, d, cap, pos0 };
            let (q, k, v) = (noise(t * n_heads * d, 5), noise(cap * d, 6), noise(cap * d, 7));
            let sinks = noise(n_heads, 8);
            let mut got = vec![f32::NAN; q.len()];
            tree_attention(&q, &k, &v, &g, &tree, 0.5, window, Some(&sinks), &mut got);
            for leaf in tree.leaves() {
                let path = tree.path(leaf);
                let n = path.len();
                let pick = |src: &[f32], per: usize| -> Vec<f32> {
                    path.iter().flat_map(|&a| src[a * per..(a + 1) * per].to_vec()).collect()
                };
                let mut kp = k[..pos0 * d].to_vec();
                kp.extend(pick(&k[pos0 * d..], d));
                let mut vp = v[..pos0 * d].to_vec();
                vp.extend(pick(&v[pos0 * d..], d));
                let qp = pick(&q, n_heads * d);
                let gp = Geometry { cap: pos0 + n, ..g };
                let mut want = vec![f32::NAN; qp.len()];
                attention(&qp, &kp, &vp, &gp, 0.5, window, Some(&sinks), &mut want);
                let mine = pick(&got, n_heads * d);
                let worst = mine.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(worst <= 2e-5, "leaf {leaf} {window:?}: {worst}");
            }
        }
    }

    /// A bf16 cache (the CPU's with bf16 activations) gives what the f32 cache of the same
    /// values widened gives, exactly: the kernel widens each element as it reads it.
    #[test]
    fn a_bf16_cache_reads_as_its_widened_values() {
        let tree = TreeMask::new(&[None, Some(0), Some(0), Some(2)]).expect("tree");
        let (t, n_heads, n_kv, d, pos0) = (tree.len(), 4, 2, 16, 30);
        let cap = pos0 + t;
        let g = Geometry { n_heads, n_kv, d, cap, pos0 };
        let q = noise(t * n_heads * d, 9);
        let kb: Vec<half::bf16> = noise(n_kv * cap * d, 10).into_iter().map(half::bf16::from_f32).collect();
        let vb: Vec<half::bf16> = noise(n_kv * cap * d, 11).into_iter().map(half::bf16::from_f32).collect();
        let (kw, vw): (Vec<f32>, Vec<f32>) =
            (kb.iter().map(|x| x.to_f32()).collect(), vb.iter().map(|x| x.to_f32()).collect());
        let mut want = vec![f32::NAN; q.len()];
        tree_attention(&q, &kw, &vw, &g, &tree, 0.25, Some(5), None, &mut want);
        let mut got = vec![f32::NAN; q.len()];
        tree_attention(&q, &kb, &vb, &g, &tree, 0.25, Some(5), None, &mut got);
        assert_eq!(got, want);
        assert!(got.iter().all(|x| x.is_finite()));
    }
}
