//! Verification of drafted tokens against the target's logits from one forward: greedy
//! acceptance (the target's argmax must equal the draft, so the output is plain greedy
//! decoding's) or speculative sampling's rejection scheme (Leviathan et al. 2023, Chen et al.
//! 2023), which leaves the target's distribution exactly as it is. A tree of drafts
//! ([`verify_tree`]) is walked from the root: greedy follows the child equal to the target's
//! argmax; sampling tries a node's children in order, each against the residual distribution
//! the rejections before it left (multi-candidate speculative sampling, as in SpecInfer and
//! SpecTr), which again leaves the target's distribution exactly as it is.

use super::Draft;
use crate::Sampler;

/// What one verification decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Draft tokens accepted, from the front.
    pub accepted: usize,
    /// The target's own token after them: its correction at the first rejected position, or a
    /// bonus token when every draft was accepted.
    pub next: u32,
}

/// Decides how many of `draft`'s tokens the target keeps. `rows` is `[draft.len() + 1, vocab]`
/// logits (modified in place by the sampler's penalty): row `i` is the target's next-token
/// logits after `history` (the sequence up to the token the forward started with) and
/// `draft.tokens[..i]`.
///
/// Sampling: draft token `d` at row `i` is kept with probability `min(1, p(d) / q(d))`, `p`
/// the target's distribution (after temperature, top-k/p, min-p, penalty) and `q` the draft's
/// (a point mass for a drafter that proposes without a distribution, such as n-gram lookup);
/// at the first rejection the token is drawn from `max(0, p - q)`, normalised. The emitted
/// token then has distribution `p` exactly, whatever `q` is.
pub fn verify(rows: &mut [f32], vocab: usize, draft: &Draft, history: &[u32], sampler: &mut Sampler) -> Verdict {
    let mut hist = history.to_vec();
    for (i, &d) in draft.tokens.iter().enumerate() {
        let row = &mut rows[i * vocab..(i + 1) * vocab];
        if sampler.is_greedy() {
            let t = sampler.sample(row, &hist);
            if t != d {
                return Verdict { accepted: i, next: t };
            }
        } else {
            let p = sampler.distribution(row, &hist);
            let p_d = p.iter().find(|c| c.0 == d).map_or(0.0, |c| c.1);
            let q_d = draft.q(i, d);
            // u < p/q accepts with probability min(1, p/q); q_d = 0 cannot have been drawn.
            let accept = q_d > 0.0 && (sampler.uniform() as f32) * q_d < p_d;
            if !accept {
                let residual: Vec<(u32, f32)> = p.iter().map(|&(x, px)| (x, (px - draft.q(i, x)).max(0.0))).collect();
                let total: f32 = residual.iter().map(|c| c.1).sum();
                // total is 0 only when p = q up to rounding, where rejection has probability 0.
                let next = match total > 0.0 {
                    true => sampler.draw(&residual, total),
                    false => sampler.draw(&p, 1.0),
                };
                return Verdict { accepted: i, next };
            }
        }
        hist.push(d);
    }
    let k = draft.tokens.len();
    let next = sampler.sample(&mut rows[k * vocab..(k + 1) * vocab], &hist);
    Verdict { accepted: k, next }
}

/// What one tree verification decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeVerdict {
    /// The accepted draft nodes, from the root down (each the parent of the next).
    pub path: Vec<usize>,
    /// The target's own token after them: drawn where every child was rejected, or a bonus
    /// token below a leaf.
    pub next: u32,
}

/// Decides which path of `draft`'s tree the target keeps. `rows` is `[1 + draft.len(), vocab]`
/// logits (modified in place by the sampler's penalty): row 0 is the target's next-token
/// logits after `history` (the sequence up to the pending token, the tree's root), row `1 + i`
/// after node `i`'s path.
///
/// Greedy: from the root, the child whose token is the target's argmax, while there is one;
/// the output is plain greedy decoding's. Sampling, at each node with target distribution `p`:
/// child `c` (in order) is kept with probability `min(1, p(c) / q_c(c))`, `q_c` the draft's
/// distribution it was drawn from (a point mass for n-gram lookup and greedy drafting); on a
/// rejection `p` becomes `max(0, p - q_c)`, normalised, and the next child is tried against it.
/// When all are rejected the token is drawn from the last `p`. Siblings are distinct point
/// masses or independent draws from one `q` (the draft model): either way the emitted token has
/// distribution `p` exactly.
pub fn verify_tree(
    rows: &mut [f32],
    vocab: usize,
    draft: &Draft,
    history: &[u32],
    sampler: &mut Sampler,
) -> TreeVerdict {
    let mut hist = history.to_vec();
    let mut path = Vec::new();
    let mut at: Option<usize> = None;
    loop {
        let r = at.map_or(0, |i| i + 1);
        let row = &mut rows[r * vocab..(r + 1) * vocab];
        let children = draft.children(at);
        if children.is_empty() {
            return TreeVerdict { path, next: sampler.sample(row, &hist) };
        }
        let kept = if sampler.is_greedy() {
            let t = sampler.sample(row, &hist);
            match children.iter().find(|&&c| draft.tokens[c] == t) {
                Some(&c) => c,
                None => return TreeVerdict { path, next: t },
            }
        } else {
            let mut p = sampler.distribution(row, &hist);
            let mut total = 1.0f32;
            let mut kept = None;
            for &c in &children {
                let d = draft.tokens[c];
                let p_d = p.iter().find(|x| x.0 == d).map_or(0.0, |x| x.1) / total;
                let q_d = draft.q(c, d);
                // u < p/q accepts with probability min(1, p/q); q_d = 0 cannot have been drawn.
                if q_d > 0.0 && (sampler.uniform() as f32) * q_d < p_d {
                    kept = Some(c);
                    break;
                }
                // p <- max(0, p - q) over the current (unnormalised, sum `total`) p.
                let residual: Vec<(u32, f32)> =
                    p.iter().map(|&(x, px)| (x, (px / total - draft.q(c, x)).max(0.0))).collect();
                let sum: f32 = residual.iter().map(|x| x.1).sum();
                // 0 only when p = q up to rounding, where rejection has probability 0.
                if sum > 0.0 {
                    (p, total) = (residual, sum);
                }
            }
            match kept {
                Some(c) => c,
                None => return TreeVerdict { path, next: sampler.draw(&p, total) },
            }
        };
        path.push(kept);
        hist.push(draft.tokens[kept]);
        at = Some(kept);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SamplingParams;

    fn sampler(seed: u64, temperature: f32) -> Sampler {
        Sampler::new(SamplingParams { temperature, seed, ..SamplingParams::greedy() }).expect("valid")
    }

    #[test]
    fn greedy_keeps_the_argmax_prefix_and_adds_the_targets_token() {
        // vocab 4; the target's argmaxes are 2, 1, 3, 0.
        let rows = [0., 0., 9., 0., 0., 9., 0., 0., 0., 0., 0., 9., 9., 0., 0., 0.];
        let run = |tokens: Vec<u32>| {
            let draft = Draft::chain(tokens, Vec::new());
            verify(&mut rows[..4 * (draft.tokens.len() + 1)].to_vec(), 4, &draft, &[0], &mut sampler(0, 0.0))
        };
        assert_eq!(run(vec![2, 1, 3]), Verdict { accepted: 3, next: 0 });
        assert_eq!(run(vec![2, 0, 3]), Verdict { accepted: 1, next: 1 });
        assert_eq!(run(vec![3, 1, 3]), Verdict { accepted: 0, next: 2 });
        assert_eq!(run(vec![]), Verdict { accepted: 0, next: 2 });
    }

    /// Pearson's chi-square of `counts` against probabilities `want` over `n` draws.
    fn chi_square(counts: &[usize], want: &[f64], n: usize) -> f64 {
        counts.iter().zip(want).map(|(&c, &p)| (c as f64 - p * n as f64).powi(2) / (p * n as f64)).sum()
    }

    /// The first emitted token of a verification is distributed as the target's `p`, whatever
    /// the draft's `q` (a point mass, a distribution unlike `p`, one equal to it): 20,000 fixed
    /// seeds each, chi-square with 4 degrees of freedom below 18.47 (p = 0.001). A scheme that
    /// emitted the draft token unchecked gives a statistic in the thousands.
    #[test]
    fn rejection_sampling_keeps_the_targets_distribution() {
        let p = [0.1f64, 0.2, 0.3, 0.25, 0.15];
        let logits: Vec<f32> = p.iter().map(|x| x.ln() as f32).collect();
        let rows: Vec<f32> = [logits.clone(), logits.clone()].concat();
        let n = 20_000;
        let q_unlike = vec![0.6f32, 0.05, 0.05, 0.1, 0.2];
        for (name, q) in
            [("point mass", None), ("unlike", Some(q_unlike)), ("equal", Some(p.map(|x| x as f32).to_vec()))]
        {
            let mut counts = [0usize; 5];
            let mut draws = sampler(99, 1.0);
            for seed in 0..n as u64 {
                let mut s = sampler(seed, 1.0);
                let (token, probs) = match &q {
                    None => (4, Vec::new()),
                    Some(q) => {
                        let dist: Vec<(u32, f32)> = q.iter().enumerate().map(|(i, &w)| (i as u32, w)).collect();
                        (draws.draw(&dist, 1.0), vec![q.clone()])
                    }
                };
                let draft = Draft::chain(vec![token], probs);
                let v = verify(&mut rows.clone(), 5, &draft, &[], &mut s);
                let first = if v.accepted == 1 { token } else { v.next };
                counts[first as usize] += 1;
            }
            let chi = chi_square(&counts, &p, n);
            assert!(chi < 18.47, "{name}: chi-square {chi:.1} over {counts:?}");
        }
        // The check can fail: emitting the point-mass draft always is far off.
        assert!(chi_square(&[0, 0, 0, 0, n], &p, n) > 1000.0);
    }

    /// Greedy tree verification follows the child equal to each row's argmax and stops where
    /// none is, or below a leaf with a bonus token.
    #[test]
    fn greedy_walks_the_tree_along_the_argmax() {
        // vocab 4. Nodes: 0 = 2 (root child), 1 = 1 under 0, 2 = 3 under 0, 3 = 0 (root child),
        // 4 = 0 under 2. Rows: root argmax 2; after node 0: 3; after node 2: 0; after node 4: 1.
        let argmax = [2usize, 3, 1, 0, 2, 1];
        let rows: Vec<f32> = argmax.iter().flat_map(|&a| (0..4).map(move |x| if x == a { 9.0 } else { 0.0 })).collect();
        let draft = Draft {
            tokens: vec![2, 1, 3, 0, 0],
            probs: Vec::new(),
            parents: vec![None, Some(0), Some(0), None, Some(2)],
        };
        let v = verify_tree(&mut rows.clone(), 4, &draft, &[0], &mut sampler(0, 0.0));
        // Argmax 2 = node 0; then 3 = node 2 (not node 1, which came first); then 0 = node 4;
        // node 4 is a leaf: the bonus token is row 5's argmax.
        assert_eq!(v, TreeVerdict { path: vec![0, 2, 4], next: 1 });
        // The root's argmax matches no child: nothing kept, the target's token.
        let other = Draft { tokens: vec![1, 3], probs: Vec::new(), parents: vec![None, None] };
        let v = verify_tree(&mut rows[..12].to_vec(), 4, &other, &[0], &mut sampler(0, 0.0));
        assert_eq!(v, TreeVerdict { path: vec![], next: 2 });
    }

    /// The first emitted token of a tree verification is distributed as the target's `p` when
    /// the root has several candidates: distinct point masses (n-gram lookup's branches) and
    /// independent draws from a `q` unlike `p` (a draft model's siblings, duplicates and all),
    /// each child tried against the residual the rejections before it left. 20,000 fixed seeds
    /// each, chi-square with 4 degrees of freedom below 18.47 (p = 0.001). Emitting the first
    /// candidate unchecked, or trying the later ones against `p` itself, is far off.
    #[test]
    fn multi_candidate_rejection_keeps_the_targets_distribution() {
        let p = [0.1f64, 0.2, 0.3, 0.25, 0.15];
        let logits: Vec<f32> = p.iter().map(|x| x.ln() as f32).collect();
        let rows: Vec<f32> = logits.iter().copied().cycle().take(5 * 4).collect();
        let n = 20_000;
        let q_unlike = vec![0.6f32, 0.05, 0.05, 0.1, 0.2];
        let dist: Vec<(u32, f32)> = q_unlike.iter().enumerate().map(|(i, &w)| (i as u32, w)).collect();
        for name in ["point masses", "independent draws"] {
            let mut counts = [0usize; 5];
            let mut draws = sampler(99, 1.0);
            for seed in 0..n as u64 {
                let mut s = sampler(seed, 1.0);
                let draft = match name {
                    "point masses" => Draft { tokens: vec![4, 0, 2], probs: Vec::new(), parents: vec![None; 3] },
                    _ => Draft {
                        tokens: (0..3).map(|_| draws.draw(&dist, 1.0)).collect(),
                        probs: vec![q_unlike.clone(); 3],
                        parents: vec![None; 3],
                    },
                };
                let v = verify_tree(&mut rows.clone(), 5, &draft, &[], &mut s);
                let first = v.path.first().map_or(v.next, |&c| draft.tokens[c]);
                counts[first as usize] += 1;
            }
            let chi = chi_square(&counts, &p, n);
            assert!(chi < 18.47, "{name}: chi-square {chi:.1} over {counts:?}");
        }
        // The check can fail: point masses on 4, 0, 2 each tried against p itself (no
        // residual), then a draw from p, emit token x with probability
        // [x is a candidate] · p(x) · P(the ones before were rejected) + P(all rejected) · p(x).
        // Before 0: 4 rejected (0.85); before 2: 4 and 0 (0.85 · 0.9); 4 is first.
        let rejected_before = [0.85, 1.0, 0.85 * 0.9, 1.0, 1.0];
        let all_rejected = 0.85 * 0.9 * 0.7;
        let no_residual: Vec<f64> = (0..5)
            .map(|x| {
                let candidate = [4, 0, 2].contains(&x);
                f64::from(u8::from(candidate)) * p[x] * rejected_before[x] + all_rejected * p[x]
            })
            .collect();
        let broken: Vec<usize> = no_residual.iter().map(|x| (x * n as f64) as usize).collect();
        assert!(chi_square(&broken, &p, n) > 1000.0, "{}", chi_square(&broken, &p, n));
        assert!(chi_square(&[0, 0, 0, 0, n], &p, n) > 1000.0);
    }
}
