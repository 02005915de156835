//! Log-probabilities of the generated tokens (OpenAI's `logprobs` / `top_logprobs`).
//!
//! They are the model's own distribution: the log-softmax of the raw logits row the token was
//! drawn from, before the repetition penalty, temperature, top-k/p, min-p and the grammar mask
//! (vLLM's default, `raw_logprobs`). So they do not depend on the sampling settings, and a token
//! a grammar forbade may still appear among the alternatives.

/// Most alternatives a token may list (OpenAI's limit for `top_logprobs`).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One generated token's log-probability and the most likely tokens at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    /// ln p(id); ≤ 0, `-inf` for a token the model gives no chance.
    pub logprob: f32,
    /// The most likely tokens at this position, most likely first (ties: lower id first):
    /// (id, ln p). As many as asked, fewer when the vocabulary is smaller.
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprob {
    /// From the raw logits row `logits` the token `id` was drawn from, with the `top` most likely
    /// alternatives.
    pub fn from_logits(logits: &[f32], id: u32, top: usize) -> Self {
        let lse = log_sum_exp(logits);
        let lp = |l: f32| l - lse;
        let logprob = logits.get(id as usize).map_or(f32::NEG_INFINITY, |&l| lp(l));
        let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
        if top > 0 {
            for (i, &l) in logits.iter().enumerate() {
                // Keep the `top` largest in order; a candidate enters only when it beats the last.
                let beats = |b: &(u32, f32)| l > b.1;
                if best.len() == top && !best.last().is_some_and(beats) {
                    continue;
                }
                let at = best.iter().position(beats).unwrap_or(best.len());
                best.insert(at, (i as u32, l));
                best.truncate(top);
            }
        }
        Self { id, logprob, top: best.into_iter().map(|(i, l)| (i, lp(l))).collect() }
    }
}

/// ln Σ exp(l), computed stably; `-inf` for an empty or all `-inf` row.
fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    max + sum.ln() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_the_log_softmax_with_a_sorted_top_list() {
        // probabilities 1/8, 2/8, 5/8 (and a token with none)
        let logits = [0.0f32, (2.0f32).ln(), (5.0f32).ln(), f32::NEG_INFINITY];
        let t = TokenLogprob::from_logits(&logits, 1, 3);
        assert!((t.logprob - (0.25f32).ln()).abs() < 1e-6, "{}", t.logprob);
        assert_eq!(t.top.iter().map(|p| p.0).collect::<Vec<_>>(), [2, 1, 0]);
        for (got, want) in t.top.iter().zip([0.625f32, 0.25, 0.125]) {
            assert!((got.1 - want.ln()).abs() < 1e-6, "{got:?} vs {want}");
        }
        assert_eq!(TokenLogprob::from_logits(&logits, 3, 0).logprob, f32::NEG_INFINITY);
        assert!(TokenLogprob::from_logits(&logits, 0, 0).top.is_empty());
        // Ties keep the lower id first; asking for more than the row holds gives the row.
        let t = TokenLogprob::from_logits(&[1.0, 1.0, 1.0], 2, 5);
        assert_eq!(t.top.iter().map(|p| p.0).collect::<Vec<_>>(), [0, 1, 2]);
    }
}
