//! Attention of a tree of new tokens over a KV cache ([`TreeMask`]) of f32 or bf16: the CPU twin
//! of `kernels/tree_attention.cu`. It runs the flash form of [`attention`](super::attention) with
//! the tree's mask, so a node on a path kept in order (its ancestors the rows just before it) gets
//! bit for bit what one-row decoding of that path gives.

use super::attention::{Geometry, KvElem, attention_masked};
use super::kernels::Kernels;
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
    tree_attention_at(q, (k, v, g), tree, (scale, window, sinks), 0, out);
}

/// [`tree_attention`] over a cache whose row 0 holds position `origin` (a sliding or offloaded
/// cache's base).
pub(crate) fn tree_attention_at<E: KvElem>(
    q: &[f32],
    (k, v, g): (&[E], &[E], &Geometry),
    tree: &TreeMask,
    settings: (f32, Option<usize>, Option<&[f32]>),
    origin: usize,
    out: &mut [f32],
) {
    attention_masked(Kernels::active(), q, (k, v, g), settings, Some(tree), origin, out);
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

    /// A chain is causal attention (the flash kernel), with windows and sinks, bit for bit.
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
            assert_eq!(got, want, "T={t} pos0={pos0} {window:?}: a chain is bit for bit causal attention");
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
