//! A draft model: a small model with the target's tokenizer, kept resident, decoding a few
//! tokens ahead in its own session; the target verifies them in one forward.
//!
//! As a tree ([`Drafter::draft_tree`]), the draft decodes its chain as before and, at the
//! first depths, adds its next best candidates as siblings of the chain's token — wide near the
//! root, where the chain most often breaks, at no extra draft forward: [`alternates`] says how
//! many per depth for a budget of K nodes. Under greedy decoding they are the draft's top
//! tokens after its own; under sampling further independent draws from the same distribution
//! (what the multi-candidate rejection scheme needs to keep the target's distribution).

use std::sync::Arc;

use ollm_models::CausalLm;
use ollm_tokenizer::Tokenizer;

use super::{Draft, Drafter};
use crate::{EngineError, Result, Sampler, SamplingParams, Session};

/// A draft model whose tokenizer was checked against the target's: the same ids mean the same
/// tokens. Shares the model.
#[derive(Debug)]
pub struct DraftModel {
    model: Arc<dyn CausalLm>,
}

impl DraftModel {
    /// Refuses a draft whose tokenizer differs from the target's (its size, or the token any id
    /// stands for). The models' logits may be wider than the tokenizers (padded rows): a drafted
    /// id the target has no row for is simply rejected.
    pub fn new(model: Arc<dyn CausalLm>, draft: &Tokenizer, target: &Tokenizer) -> Result<Self> {
        let (n_draft, n_target) = (draft.vocab_size(), target.vocab_size());
        if n_draft != n_target {
            let detail = format!("{n_draft} tokens in {}, {n_target} in {}", show(draft), show(target));
            return Err(EngineError::DraftVocabulary { detail });
        }
        // Added tokens may sit past vocab_size (ids are not dense): compare up to the largest id.
        let top = n_target.max(model.info().vocab_size) as u32;
        if let Some(id) = (0..top).find(|&id| draft.id_to_token(id) != target.id_to_token(id)) {
            let detail = format!(
                "id {id} is {:?} in {} but {:?} in {}",
                draft.id_to_token(id).unwrap_or_default(),
                show(draft),
                target.id_to_token(id).unwrap_or_default(),
                show(target)
            );
            return Err(EngineError::DraftVocabulary { detail });
        }
        Ok(Self { model })
    }

    pub fn model(&self) -> &Arc<dyn CausalLm> {
        &self.model
    }
}

fn show(t: &Tokenizer) -> String {
    t.path().display().to_string()
}

/// Owns the draft's session (its KV cache) and a sampler for drawing drafts; the session keeps
/// what the next context shares with the last one ([`Session::rewind`]), so a round feeds the
/// draft only the tokens accepted since.
#[derive(Debug)]
pub struct ModelDrafter {
    session: Session,
    sampler: Sampler,
}

impl ModelDrafter {
    /// Drafts greedily under greedy decoding, else from the draft's own distribution under the
    /// target's sampling parameters (another seed).
    pub fn new(draft: &DraftModel, sampling: &SamplingParams) -> Result<Self> {
        let params = SamplingParams { seed: sampling.seed ^ 0xD4AF_7000_5EED_0001, ..sampling.clone() };
        Ok(Self { session: Session::new(draft.model.clone())?, sampler: Sampler::new(params)? })
    }
}

/// Candidates added beside the chain's token at each depth for a tree of `k` nodes: at most
/// a third of the budget, 3 at the root, 2 at depth 1, 1 at depth 2 (most rejections happen
/// early), and only at depths the chain reaches. The chain gets the rest.
pub fn alternates(k: usize) -> Vec<usize> {
    let mut left = k / 3;
    let mut per_depth = Vec::new();
    for want in [3usize, 2, 1] {
        let n = want.min(left);
        // The chain must reach this depth: k - alternates > depth.
        if n == 0 || k - (k / 3 - left + n) <= per_depth.len() {
            break;
        }
        per_depth.push(n);
        left -= n;
    }
    per_depth
}

impl ModelDrafter {
    /// The chain of `k` tokens and, at depth d, `alts[d]` more candidates drawn from the same
    /// logits (numbered after the chain, so the chain is nodes `0..` in order).
    fn draft_with(&mut self, context: &[u32], k: usize, alts: &[usize]) -> Result<Draft> {
        let room = self.session.model().info().max_positions.saturating_sub(context.len());
        let k = k.min(room);
        if k == 0 || context.is_empty() {
            return Ok(Draft::default());
        }
        let chain_len = k - alts.iter().sum::<usize>().min(k - 1);
        let kept = self.session.rewind(context);
        let mut logits = self.session.prefill(&context[kept..])?;
        let mut draft = Draft::default();
        // (depth, token, q) of the candidates beside the chain.
        let mut side: Vec<(usize, u32, Option<Vec<f32>>)> = Vec::new();
        for i in 0..chain_len {
            let extra = alts.get(i).copied().unwrap_or(0);
            // The history the penalty sees: the context and the drafts fed so far.
            let t = match self.sampler.is_greedy() {
                true => {
                    let t = self.sampler.sample(&mut logits, self.session.tokens());
                    side.extend(top_except(&logits, t, extra).into_iter().map(|x| (i, x, None)));
                    t
                }
                false => {
                    let q = self.sampler.distribution(&mut logits, self.session.tokens());
                    let t = self.sampler.draw(&q, 1.0);
                    let mut dense = vec![0.0; logits.len()];
                    for &(id, p) in &q {
                        dense[id as usize] = p;
                    }
                    for _ in 0..extra {
                        side.push((i, self.sampler.draw(&q, 1.0), Some(dense.clone())));
                    }
                    draft.probs.push(dense);
                    t
                }
            };
            draft.tokens.push(t);
            if i + 1 < chain_len {
                logits = self.session.step(t)?;
            }
        }
        if side.is_empty() {
            return Ok(draft);
        }
        draft.parents = (0..chain_len).map(|i| i.checked_sub(1)).collect();
        for (depth, t, q) in side {
            draft.tokens.push(t);
            draft.parents.push(depth.checked_sub(1));
            if let Some(q) = q {
                draft.probs.push(q);
            }
        }
        Ok(draft)
    }
}

/// The `n` highest-scoring ids of `logits` other than `t`, best first.
fn top_except(logits: &[f32], t: u32, n: usize) -> Vec<u32> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (id, &x) in logits.iter().enumerate() {
        if id as u32 == t || best.len() == n && best.last().is_some_and(|b| b.1 >= x) {
            continue;
        }
        let at = best.partition_point(|b| b.1 >= x);
        best.insert(at, (id as u32, x));
        best.truncate(n);
    }
    best.into_iter().map(|b| b.0).collect()
}

impl Drafter for ModelDrafter {
    fn draft(&mut self, context: &[u32], k: usize) -> Result<Draft> {
        self.draft_with(context, k, &[])
    }

    fn draft_tree(&mut self, context: &[u32], k: usize) -> Result<Draft> {
        self.draft_with(context, k, &alternates(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternates_are_wide_near_the_root_and_leave_the_chain_the_rest() {
        assert_eq!(alternates(1), Vec::<usize>::new());
        assert_eq!(alternates(3), [1]);
        assert_eq!(alternates(4), [1]);
        assert_eq!(alternates(8), [2]);
        assert_eq!(alternates(9), [3]);
        assert_eq!(alternates(16), [3, 2]);
        assert_eq!(alternates(64), [3, 2, 1]);
        for k in 1..80 {
            let a = alternates(k);
            assert!(a.iter().sum::<usize>() <= k / 3 && k - a.iter().sum::<usize>() > a.len(), "{k}: {a:?}");
        }
        assert_eq!(top_except(&[0.5, 3.0, -1.0, 2.0, 2.5], 1, 2), [4, 3]);
        assert_eq!(top_except(&[0.5, 3.0], 1, 4), [0]);
    }
}
