//! Verification of drafted tokens against the target's logits from one forward: greedy
//! acceptance (the target's argmax must equal the draft, so the output is plain greedy
//! decoding's) or speculative sampling's rejection scheme (Leviathan et al. 2023, Chen et al.
//! 2023), which leaves the target's distribution exactly as it is.

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
            let draft = Draft { tokens, probs: Vec::new() };
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
                let draft = Draft { tokens: vec![token], probs };
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
}
