//! `--speculate` and `--draft-tokens`: the drafter a command's generations use; a draft model
//! is loaded beside the target (on its backend, every weight resident) and counted by the
//! planner ([`Budgets::draft`](crate::planning::Budgets)).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use ollm_engine::{DraftModel, DraftTokens, SpecStats, Speculate, SpeculateParams};
use ollm_tokenizer::Tokenizer;

use crate::commands::ModelArgs;
use crate::loaded::{Loaded, model_dir};
use crate::planning::DraftBytes;

/// The speculation flags every generating command takes.
#[derive(Debug, Clone, Default, Args)]
pub struct SpecArgs {
    /// Speculative decoding: `ngram` (continue text found earlier in the prompt or the answer;
    /// free, strong on questions over a document, summaries, code edits) or `draft:MODEL` (a
    /// small model with the target's tokenizer, kept resident: a directory, a hub id or
    /// smollm2-135m). Greedy output stays token for token the same; sampled output keeps its
    /// distribution. Default: off.
    #[arg(long, value_name = "ngram|draft:MODEL", value_parser = parse_method)]
    pub speculate: Option<Method>,
    /// Tokens drafted per target pass: a number, or auto (chosen each pass from the measured
    /// cost of a pass against the share of drafts kept so far, at most 64).
    #[arg(long, value_name = "K|auto", requires = "speculate")]
    pub draft_tokens: Option<DraftTokens>,
}

/// Which drafter `--speculate` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    Ngram,
    /// The draft model as `--model` would name it.
    Draft(String),
}

/// `--speculate` values: `ngram` or `draft:MODEL`.
pub fn parse_method(s: &str) -> Result<Method, String> {
    match s.trim() {
        "ngram" => Ok(Method::Ngram),
        m => match m.strip_prefix("draft:") {
            Some(model) if !model.is_empty() => Ok(Method::Draft(model.to_string())),
            _ => Err(format!(
                "'{s}': expected ngram or draft:MODEL (a model directory, a hub id ORG/NAME or smollm2-135m)"
            )),
        },
    }
}

impl SpecArgs {
    /// The draft model's directory, when `--speculate draft:MODEL` names one (a hub id is
    /// downloaded on first use).
    pub fn draft_dir(&self) -> anyhow::Result<Option<PathBuf>> {
        match &self.speculate {
            Some(Method::Draft(m)) => Ok(Some(model_dir(m).with_context(|| format!("--speculate draft:{m}"))?)),
            _ => Ok(None),
        }
    }

    /// What the planner must leave on the device for the draft model (nothing without one).
    pub fn draft_bytes(&self) -> anyhow::Result<Option<DraftBytes>> {
        self.draft_dir()?.map(|dir| DraftBytes::of(&dir)).transpose()
    }

    /// Loads the target with room left for the draft model.
    pub fn load(&self, model: &ModelArgs) -> anyhow::Result<Loaded> {
        crate::loaded::load_with_draft(model, self.draft_bytes()?)
    }

    /// The engine's parameters: a draft model is loaded on the target's backend and refused
    /// when its tokenizer differs from `target`'s.
    pub fn params(&self, loaded: &Loaded, target: &Tokenizer) -> anyhow::Result<Option<SpeculateParams>> {
        let draft_tokens = self.draft_tokens.unwrap_or(DraftTokens::Auto);
        let method = match &self.speculate {
            None => return Ok(None),
            Some(Method::Ngram) => Speculate::Ngram,
            Some(Method::Draft(m)) => {
                let dir = model_dir(m).with_context(|| format!("--speculate draft:{m}"))?;
                let model = ollm_models::load_model(&dir, loaded.backend.clone())
                    .with_context(|| format!("loading the draft model {}", dir.display()))?;
                let tokenizer = Tokenizer::from_dir(&dir)?;
                let draft =
                    DraftModel::new(model, &tokenizer, target).with_context(|| format!("--speculate draft:{m}"))?;
                Speculate::Draft(Arc::new(draft))
            }
        };
        Ok(Some(SpeculateParams::new(method, draft_tokens)))
    }
}

/// ` | 3.42 tokens per target pass, 61% of 120 drafts kept` for the stats line, and
/// `, 9 passes verified a tree` when drafts branched (tree nodes count as drafts).
pub fn describe(s: &SpecStats) -> String {
    let trees = match s.tree_passes {
        0 => String::new(),
        n => format!(", {n} passes verified a tree"),
    };
    format!(
        " | {:.2} tokens per target pass, {:.0}% of {} drafts kept{trees}",
        s.tokens_per_pass(),
        100.0 * s.acceptance(),
        s.drafted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(parse_method("ngram"), Ok(Method::Ngram));
        assert_eq!(parse_method("draft:org/small"), Ok(Method::Draft("org/small".into())));
        for bad in ["draft:", "ngrams", "", "mtp"] {
            let e = parse_method(bad).expect_err(bad);
            assert!(e.contains("draft:MODEL") && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn the_stats_line_names_tree_passes_only_when_there_were_some() {
        let chain = SpecStats { passes: 10, drafted: 40, accepted: 20, ..SpecStats::default() };
        assert_eq!(describe(&chain), " | 3.00 tokens per target pass, 50% of 40 drafts kept");
        let tree = SpecStats { tree_passes: 9, ..chain };
        assert_eq!(describe(&tree), " | 3.00 tokens per target pass, 50% of 40 drafts kept, 9 passes verified a tree");
    }
}
