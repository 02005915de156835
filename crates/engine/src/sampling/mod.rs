//! Choosing the next token: repetition penalty, then temperature, top-k, top-p and min-p (the
//! order transformers applies them), then a draw from a seeded generator. Temperature 0 is greedy.

mod rng;

pub use rng::SeededRng;

use crate::{EngineError, Result};

/// How to pick tokens. `temperature == 0` means greedy (argmax, ties to the lower id).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep the k most likely tokens (None = all).
    pub top_k: Option<usize>,
    /// Keep the smallest set whose probability reaches p (1 = all).
    pub top_p: f32,
    /// Drop tokens less likely than min_p × the most likely one (0 = none).
    pub min_p: f32,
    /// > 1 discourages tokens already in the sequence (1 = off).
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_k: None, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, seed: 0 }
    }

    /// Rejects values that make no sense, naming the parameter.
    pub fn validate(&self) -> Result<()> {
        let bad = |name, value: f32, expected| Err(EngineError::Sampling { name, value: value.to_string(), expected });
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature", self.temperature, "a finite number >= 0 (0 = greedy)");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "a number in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p, "a number in [0, 1]");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad("repetition_penalty", self.repetition_penalty, "a finite number > 0 (1 = off)");
        }
        if self.top_k == Some(0) {
            return Err(EngineError::Sampling { name: "top_k", value: "0".into(), expected: "a positive integer" });
        }
        Ok(())
    }
}

/// Owns the parameters and the random stream of one generation.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: SeededRng,
    /// Scratch: (token, probability) candidates.
    cands: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = SeededRng::new(params.seed);
        Ok(Self { params, rng, cands: Vec::new() })
    }

    /// Picks a token from `logits` (modified in place by the penalty); `history` holds the ids
    /// seen so far (prompt and generated), used by the repetition penalty.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        if let Some(id) = self.fill_candidates(logits, history) {
            return id;
        }
        let total: f32 = self.cands.iter().map(|c| c.1).sum();
        let mut r = self.rng.next_f64() as f32 * total;
        for c in &self.cands {
            r -= c.1;
            if r < 0.0 {
                return c.0;
            }
        }
        self.cands.last().map_or(0, |c| c.0)
    }

    /// The distribution [`sample`](Self::sample) draws from: (token, probability) pairs summing
    /// to 1, most likely first, tokens outside them at probability 0 (greedy: the argmax at 1).
    /// Speculative sampling compares it with a draft's.
    pub fn distribution(&mut self, logits: &mut [f32], history: &[u32]) -> Vec<(u32, f32)> {
        if let Some(id) = self.fill_candidates(logits, history) {
            return vec![(id, 1.0)];
        }
        let total: f32 = self.cands.iter().map(|c| c.1).sum();
        self.cands.iter().map(|&(id, w)| (id, w / total)).collect()
    }

    /// A draw from `dist` ((token, weight) pairs, weights summing to `total` > 0).
    pub fn draw(&mut self, dist: &[(u32, f32)], total: f32) -> u32 {
        let mut r = self.rng.next_f64() as f32 * total;
        for &(id, w) in dist {
            r -= w;
            if r < 0.0 {
                return id;
            }
        }
        dist.iter().rev().find(|c| c.1 > 0.0).map_or(0, |c| c.0)
    }

    /// Uniform in [0, 1) from this sampler's stream.
    pub fn uniform(&mut self) -> f64 {
        self.rng.next_f64()
    }

    /// Whether this sampler always takes the argmax (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.params.temperature == 0.0
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Applies the penalty, then leaves the kept candidates (unnormalised) in `self.cands`;
    /// returns the token at once when greedy.
    fn fill_candidates(&mut self, logits: &mut [f32], history: &[u32]) -> Option<u32> {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            apply_repetition_penalty(logits, history, p.repetition_penalty);
        }
        if p.temperature == 0.0 {
            return Some(argmax(logits));
        }
        let inv_t = 1.0 / p.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        self.cands.clear();
        self.cands.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp())));
        if let Some(k) = p.top_k.map(|k| k.max(1)).filter(|&k| k < self.cands.len()) {
            // The k most likely, found without sorting the vocabulary; only they get sorted.
            self.cands.select_nth_unstable_by(k - 1, most_likely_first);
            self.cands.truncate(k);
        }
        if p.top_p < 1.0 && p.top_k.is_none() {
            // The whole vocabulary is in play: sort only as far as the nucleus reaches. Its sum is
            // taken in f64 (in f32, 128K terms drift by ~1e-4, enough to move a flat nucleus'
            // edge by a dozen tokens).
            let total = vocabulary_sum(&self.cands);
            let keep = sorted_nucleus(&mut self.cands, total, p.top_p);
            self.cands.truncate(keep);
        } else {
            self.cands.sort_unstable_by(most_likely_first);
            let total: f32 = self.cands.iter().map(|c| c.1).sum();
            if p.top_p < 1.0 {
                let keep = nucleus_len(&self.cands, total, p.top_p).unwrap_or(self.cands.len());
                self.cands.truncate(keep);
            }
        }
        if p.min_p > 0.0 {
            let floor = self.cands[0].1 * p.min_p;
            let keep = self.cands.iter().take_while(|c| c.1 >= floor).count().max(1);
            self.cands.truncate(keep);
        }
        None
    }
}

/// Candidates are ordered most likely first; ties keep the lower id first.
fn most_likely_first(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The weights' sum, in f64 and in vocabulary order, rounded once to f32.
fn vocabulary_sum(cands: &[(u32, f32)]) -> f32 {
    cands.iter().map(|c| f64::from(c.1)).sum::<f64>() as f32
}

/// Candidates sorted first when top-p meets a whole vocabulary (more when the nucleus is wider).
const NUCLEUS_FIRST_GUESS: usize = 64;

/// The length of the shortest prefix of `sorted` whose weights reach `top_p` of `total`; None
/// when the whole list does not.
fn nucleus_len(sorted: &[(u32, f32)], total: f32, top_p: f32) -> Option<usize> {
    let mut acc = 0.0;
    for (i, c) in sorted.iter().enumerate() {
        acc += c.1 / total;
        if acc >= top_p {
            return Some(i + 1);
        }
    }
    None
}

/// Sorts the head of `cands` (most likely first) until it holds the top-p nucleus and returns
/// the nucleus' length: the 64 most likely first, then 8 times as many while the nucleus is
/// wider, the whole list at worst. Sorting all of a 128K vocabulary for every sampled token costs
/// milliseconds; a nucleus is usually a few dozen tokens. The prefix and its order are exactly
/// those of a full sort.
fn sorted_nucleus(cands: &mut [(u32, f32)], total: f32, top_p: f32) -> usize {
    let mut head = NUCLEUS_FIRST_GUESS;
    loop {
        if head >= cands.len() {
            cands.sort_unstable_by(most_likely_first);
            return nucleus_len(cands, total, top_p).unwrap_or(cands.len());
        }
        cands.select_nth_unstable_by(head - 1, most_likely_first);
        cands[..head].sort_unstable_by(most_likely_first);
        if let Some(n) = nucleus_len(&cands[..head], total, top_p) {
            return n;
        }
        head *= 8;
    }
}

/// Index of the largest logit; the lower index wins ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// transformers' rule: a seen token's logit is divided by the penalty if positive, multiplied if
/// negative (each distinct token once).
fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    let mut seen = vec![false; logits.len()];
    for &id in history {
        let i = id as usize;
        if i < logits.len() && !seen[i] {
            seen[i] = true;
            logits[i] = if logits[i] < 0.0 { logits[i] * penalty } else { logits[i] / penalty };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams { temperature, ..SamplingParams::greedy() }
    }

    #[test]
    fn greedy_takes_argmax_with_low_id_ties() {
        let mut s = Sampler::new(params(0.0)).expect("valid");
        assert_eq!(s.sample(&mut [0.1, 2.0, 2.0, -1.0], &[]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_frequencies_follow_probabilities() {
        let logits = [0.0f32, (2.0f32).ln(), (5.0f32).ln()]; // probabilities 1/8, 2/8, 5/8
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams { seed, ..params(1.0) }).expect("valid");
            (0..4000).map(|_| s.sample(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        let a = run(7);
        assert_eq!(a, run(7));
        assert_ne!(a, run(8));
        let freq = |id| a.iter().filter(|&&t| t == id).count() as f32 / a.len() as f32;
        for (id, want) in [(0, 0.125), (1, 0.25), (2, 0.625)] {
            assert!((freq(id) - want).abs() < 0.03, "token {id}: {} vs {want}", freq(id));
        }
    }

    #[test]
    fn top_k_top_p_min_p_restrict_the_candidates() {
        let logits = [3.0f32, 2.9, 0.0, -5.0];
        let draw = |p: SamplingParams| {
            let mut s = Sampler::new(p).expect("valid");
            (0..500).map(|_| s.sample(&mut logits.clone(), &[])).collect::<std::collections::BTreeSet<_>>()
        };
        assert_eq!(draw(SamplingParams { top_k: Some(1), ..params(1.0) }), [0].into());
        assert_eq!(draw(SamplingParams { top_k: Some(2), ..params(1.0) }), [0, 1].into());
        assert_eq!(draw(SamplingParams { top_p: 0.5, ..params(1.0) }), [0].into());
        assert_eq!(draw(SamplingParams { min_p: 0.5, ..params(1.0) }), [0, 1].into());
        assert!(draw(params(1.0)).is_superset(&[0, 1, 2].into()), "unrestricted sampling reaches the third token");
    }

    /// The candidates by a full sort: the whole vocabulary sorted, then top-k, then top-p (over
    /// the vocabulary's f64 sum without top-k, else the f32 sum of the k in order), then min-p.
    fn candidates_by_full_sort(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f32)> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let inv_t = 1.0 / p.temperature;
        let mut c: Vec<(u32, f32)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp())).collect();
        let vocabulary = vocabulary_sum(&c);
        c.sort_unstable_by(most_likely_first);
        if let Some(k) = p.top_k {
            c.truncate(k.max(1));
        }
        let total: f32 = if p.top_k.is_some() { c.iter().map(|x| x.1).sum() } else { vocabulary };
        if p.top_p < 1.0 {
            let keep = nucleus_len(&c, total, p.top_p).unwrap_or(c.len());
            c.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = c[0].1 * p.min_p;
            let keep = c.iter().take_while(|x| x.1 >= floor).count().max(1);
            c.truncate(keep);
        }
        c
    }

    /// Partial sorts keep the candidates a full sort keeps, in its order, on vocabularies of
    /// 128K random logits (with ties) for narrow and wide nuclei, top-k, both, and min-p.
    #[test]
    fn partial_sorts_keep_what_a_full_sort_keeps() {
        let seed = std::env::var("OLLM_TEST_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_u64);
        println!("OLLM_TEST_SEED={seed}");
        let mut rng = SeededRng::new(seed);
        for case in 0..24 {
            let n = 128_256;
            // Peaked (a few large logits) or flat (wide nuclei); rounding to 1/8 makes ties.
            let spread = if case % 2 == 0 { 12.0 } else { 2.0 };
            let logits: Vec<f32> = (0..n).map(|_| ((rng.next_f64() as f32 * spread) * 8.0).round() / 8.0).collect();
            let p = SamplingParams {
                temperature: [0.6, 1.0, 1.5][case % 3],
                top_k: [None, Some(40), Some(5000), None][case % 4],
                top_p: [0.9, 0.5, 0.999, 1.0, 0.95, 0.7][case % 6],
                min_p: if case % 5 == 0 { 0.05 } else { 0.0 },
                seed: 1,
                ..SamplingParams::greedy()
            };
            let mut s = Sampler::new(p.clone()).expect("valid");
            assert!(s.fill_candidates(&mut logits.clone(), &[]).is_none());
            let want = candidates_by_full_sort(&logits, &p);
            let ids = |c: &[(u32, f32)]| c.iter().map(|x| x.0).collect::<Vec<_>>();
            assert_eq!(ids(&s.cands), ids(&want), "case {case} {p:?}: {} kept against {}", s.cands.len(), want.len());
        }
    }

    #[test]
    fn repetition_penalty_follows_transformers() {
        let mut l = [2.0f32, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, [1.0, -4.0, 1.0]);
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 4.0, ..params(0.0) }).expect("valid");
        assert_eq!(s.sample(&mut [2.0, 1.0], &[0]), 1);
    }

    #[test]
    fn bad_values_are_rejected_by_name() {
        let e = Sampler::new(SamplingParams { top_p: 1.5, ..params(1.0) }).expect_err("invalid");
        assert!(e.to_string().contains("top_p"), "{e}");
        assert!(Sampler::new(params(-1.0)).is_err());
    }
}
