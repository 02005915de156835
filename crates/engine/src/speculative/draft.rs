//! A draft model: a small model with the target's tokenizer, kept resident, decoding a few
//! tokens ahead in its own session; the target verifies them in one forward.

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

impl Drafter for ModelDrafter {
    fn draft(&mut self, context: &[u32], k: usize) -> Result<Draft> {
        let room = self.session.model().info().max_positions.saturating_sub(context.len());
        let k = k.min(room);
        if k == 0 || context.is_empty() {
            return Ok(Draft::default());
        }
        let kept = self.session.rewind(context);
        let mut logits = self.session.prefill(&context[kept..])?;
        let mut draft = Draft::default();
        for i in 0..k {
            // The history the penalty sees: the context and the drafts fed so far.
            let t = match self.sampler.is_greedy() {
                true => self.sampler.sample(&mut logits, self.session.tokens()),
                false => {
                    let q = self.sampler.distribution(&mut logits, self.session.tokens());
                    let t = self.sampler.draw(&q, 1.0);
                    let mut dense = vec![0.0; logits.len()];
                    for (id, p) in q {
                        dense[id as usize] = p;
                    }
                    draft.probs.push(dense);
                    t
                }
            };
            draft.tokens.push(t);
            if i + 1 < k {
                logits = self.session.step(t)?;
            }
        }
        Ok(draft)
    }
}
