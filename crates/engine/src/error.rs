//! Errors of the engine.

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ollm_models::ModelError),

    #[error(transparent)]
    Prefix(#[from] ollm_kv::prefix::PrefixError),

    #[error(transparent)]
    Tokenizer(#[from] ollm_tokenizer::TokenizerError),

    #[error(
        "the prompt has {prompt} tokens but the model's context is {context} (max_position_embeddings); shorten the prompt"
    )]
    PromptTooLong { prompt: usize, context: usize },

    #[error("the prompt is empty: give some text with --prompt, --prompt-file or standard input")]
    EmptyPrompt,

    #[error("{path}: {detail}")]
    Config { path: std::path::PathBuf, detail: String },

    #[error(
        "the forward at position {position} gave logit {value} for token {token} (NaN or infinite logits): the model's weights or config.json are broken; re-download the model"
    )]
    NonFiniteLogits { position: usize, token: usize, value: f32 },

    #[error(
        "cannot roll the sequence back to position {to}: its sliding-window layers keep positions from {min} only; use fewer --draft-tokens"
    )]
    RollBack { to: usize, min: usize },

    #[error(
        "a batched verification needs one feed per session and one model for all: got {sessions} sessions and {feeds} feeds"
    )]
    Batch { sessions: usize, feeds: usize },

    #[error(
        "the draft model's vocabulary differs from the target's ({detail}); choose a draft with the target's tokenizer (the same family, e.g. Llama-3.2-1B for Llama-3.1-8B)"
    )]
    DraftVocabulary { detail: String },
    /// A batched step failed for every sequence in it (the message of the model's error).
    #[error("{0}")]
    Step(String),

    #[error(transparent)]
    Grammar(#[from] crate::grammar::GrammarError),

    #[error("invalid sampling parameter {name} = {value}: {expected}")]
    Sampling { name: &'static str, value: String, expected: &'static str },
}

pub type Result<T> = std::result::Result<T, EngineError>;
