//! What kind of failure an error is, for front ends that map failures onto their own types (the
//! Python package raises `FileNotFoundError`, `ValueError`, `MemoryError` or `RuntimeError`),
//! and the one-line message every front end shows.

use std::error::Error as StdError;

use ollm_engine::EngineError;
use ollm_models::ModelError;
use ollm_ops::OpsError;
use ollm_residency::ResidencyError;
use ollm_residency::plan::PlanError;
use ollm_tokenizer::TokenizerError;
use ollm_weights::WeightsError;

/// `--model` names nothing: not a directory, not the demo model, not a hub id.
#[derive(Debug, thiserror::Error)]
#[error(
    "model directory {spec} does not exist (give a Hugging Face model directory with config.json and *.safetensors, a hub id ORG/NAME, or smollm2-135m or gemma3-270m for a demo model)"
)]
pub struct ModelNotFound {
    pub spec: String,
}

/// A failure's category.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A model, file or directory that does not exist.
    NotFound,
    /// An argument or an input the caller can fix (a bad option, an empty or too long prompt).
    InvalidInput,
    /// The model does not fit the memory budgets, or an allocation failed.
    OutOfMemory,
    /// Anything else (a broken checkpoint, a failed download, a backend error).
    Other,
}

/// The category of `e`: the first cause in its chain that says one.
pub fn kind(e: &anyhow::Error) -> ErrorKind {
    e.chain().find_map(kind_of).unwrap_or(ErrorKind::Other)
}

/// The message on one line: the outermost context first, then each cause (as `ollm` prints it).
pub fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

/// The category one error (not its causes) says, looking through transparent wrappers.
fn kind_of(e: &(dyn StdError + 'static)) -> Option<ErrorKind> {
    if e.is::<ModelNotFound>() {
        return Some(ErrorKind::NotFound);
    }
    if let Some(e) = e.downcast_ref::<std::io::Error>() {
        return (e.kind() == std::io::ErrorKind::NotFound).then_some(ErrorKind::NotFound);
    }
    if let Some(e) = e.downcast_ref::<PlanError>() {
        return match e {
            PlanError::Vram { .. } => Some(ErrorKind::OutOfMemory),
            PlanError::NoLayers => None,
        };
    }
    if let Some(e) = e.downcast_ref::<EngineError>() {
        return engine(e);
    }
    if let Some(e) = e.downcast_ref::<ModelError>() {
        return model(e);
    }
    if let Some(e) = e.downcast_ref::<WeightsError>() {
        return weights(e);
    }
    if let Some(e) = e.downcast_ref::<ResidencyError>() {
        return residency(e);
    }
    if let Some(e) = e.downcast_ref::<OpsError>() {
        return ops(e);
    }
    if let Some(e) = e.downcast_ref::<ollm_io::IoError>() {
        return io(e);
    }
    if let Some(e) = e.downcast_ref::<TokenizerError>() {
        return tokenizer(e);
    }
    None
}

fn engine(e: &EngineError) -> Option<ErrorKind> {
    match e {
        EngineError::EmptyPrompt | EngineError::PromptTooLong { .. } | EngineError::Sampling { .. } => {
            Some(ErrorKind::InvalidInput)
        }
        EngineError::Model(m) => model(m),
        EngineError::Tokenizer(t) => tokenizer(t),
        EngineError::Config { path, .. } if !path.exists() => Some(ErrorKind::NotFound),
        _ => None,
    }
}

fn model(e: &ModelError) -> Option<ErrorKind> {
    match e {
        ModelError::ContextOverflow { .. } | ModelError::EmptyInput | ModelError::TokenOutOfRange { .. } => {
            Some(ErrorKind::InvalidInput)
        }
        // config.json could not be read because it is not there.
        ModelError::Config { path, field, .. } if field == "(file)" && !path.exists() => Some(ErrorKind::NotFound),
        ModelError::Weights(w) => weights(w),
        ModelError::Ops(o) => ops(o),
        ModelError::Io(i) => io(i),
        ModelError::Residency(r) => residency(r),
        _ => None,
    }
}

fn weights(e: &WeightsError) -> Option<ErrorKind> {
    match e {
        WeightsError::NoWeights { .. } => Some(ErrorKind::NotFound),
        WeightsError::Io(i) => io(i),
        _ => None,
    }
}

fn residency(e: &ResidencyError) -> Option<ErrorKind> {
    match e {
        ResidencyError::Weights(w) => weights(w),
        ResidencyError::Ops(o) => ops(o),
        ResidencyError::Io(i) => io(i),
        _ => None,
    }
}

fn ops(e: &OpsError) -> Option<ErrorKind> {
    matches!(e, OpsError::OutOfMemory { .. }).then_some(ErrorKind::OutOfMemory)
}

fn io(e: &ollm_io::IoError) -> Option<ErrorKind> {
    match e {
        ollm_io::IoError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Some(ErrorKind::NotFound)
        }
        _ => None,
    }
}

fn tokenizer(e: &TokenizerError) -> Option<ErrorKind> {
    match e {
        TokenizerError::Load { path, .. } if !path.exists() => Some(ErrorKind::NotFound),
        // A template that refuses the conversation (raise_exception: roles out of order).
        TokenizerError::Template { .. } => Some(ErrorKind::InvalidInput),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn kinds_are_found_through_context_and_wrappers() {
        let missing = anyhow::Error::new(ModelNotFound { spec: "nope".into() });
        assert_eq!(kind(&missing), ErrorKind::NotFound);
        assert!(one_line(&missing).starts_with("model directory nope does not exist"));

        let too_long = Err::<(), _>(EngineError::PromptTooLong { prompt: 9, context: 8 }).context("generating");
        let too_long = too_long.expect_err("an error");
        assert_eq!(kind(&too_long), ErrorKind::InvalidInput);
        assert!(one_line(&too_long).starts_with("generating: the prompt has 9 tokens"), "{}", one_line(&too_long));

        let empty = anyhow::Error::new(EngineError::Model(ModelError::EmptyInput));
        assert_eq!(kind(&empty), ErrorKind::InvalidInput);

        let oom = anyhow::Error::new(EngineError::Model(ModelError::Ops(OpsError::OutOfMemory {
            what: "kv".into(),
            requested_bytes: 1,
            in_use_bytes: 1,
            context_bytes: 0,
            budget_bytes: 1,
            limit: ollm_ops::MemoryLimit::Budget,
        })));
        assert_eq!(kind(&oom), ErrorKind::OutOfMemory);

        let no_config = anyhow::Error::new(ModelError::Config {
            path: "/no/such/dir/config.json".into(),
            field: "(file)".into(),
            detail: "cannot read".into(),
        });
        assert_eq!(kind(&no_config), ErrorKind::NotFound);

        let broken = anyhow::Error::new(ModelError::Stream("a thread died".into())).context("loading x");
        assert_eq!(kind(&broken), ErrorKind::Other);
    }
}
