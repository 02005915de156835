//! Errors of the models layer: bad configs, unsupported features, missing or mis-shaped weights.

use std::path::PathBuf;

use ollm_weights::error::escape_controls;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: field '{}': {}", .path.display(), escape_controls(.field), escape_controls(.detail))]
    Config { path: PathBuf, field: String, detail: String },

    #[error(
        "{}: {} '{}' is not supported (supported: {supported})",
        .path.display(),
        escape_controls(.field),
        escape_controls(.value)
    )]
    Unsupported { path: PathBuf, field: String, value: String, supported: String },

    #[error(transparent)]
    Weights(#[from] ollm_weights::WeightsError),

    #[error(transparent)]
    Ops(#[from] ollm_ops::OpsError),

    #[error(transparent)]
    Io(#[from] ollm_io::IoError),

    #[error(transparent)]
    Residency(#[from] ollm_residency::ResidencyError),

    #[error("weight streaming: {0}")]
    Stream(String),

    #[error(
        "the sequence would need {needed} positions but the model's context is {max} (max_position_embeddings); shorten the prompt or lower --max-new-tokens"
    )]
    ContextOverflow { needed: usize, max: usize },

    #[error("empty input: give at least one token")]
    EmptyInput,

    #[error("token id {id} is outside the vocabulary of {vocab} (wrong tokenizer for this model?)")]
    TokenOutOfRange { id: u32, vocab: usize },

    #[error(
        "{architecture} cannot verify a tree of tokens in one forward ({why}); feed a chain (speculation falls back to one)"
    )]
    TreeUnsupported { architecture: String, why: &'static str },

    #[error("a tree of {nodes} nodes for {ids} token ids: give one parent per id")]
    TreeShape { nodes: usize, ids: usize },
}

pub type Result<T> = std::result::Result<T, ModelError>;
