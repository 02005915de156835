//! ollm-engine: sequences and the generation loop. Knows nothing of HTTP, terminals or files
//! other than a model directory's generation_config.json.

pub mod chat_model;
pub mod config;
pub mod decoding;
pub mod error;
pub mod generate;
pub mod grammar;
pub mod harmony;
pub mod logprobs;

pub mod sampling;
pub mod scheduler;
pub mod session;
pub mod speculative;
pub mod stop;
pub mod tools;

pub use chat_model::{ChatModel, session_with_prefix};
pub use config::GenerationConfig;
pub use error::{EngineError, Result};
pub use generate::{
    CancelCheck, FinishReason, GenerateParams, Generation, GenerationStats, PrefixReport, TokenEvent, generate,
    generate_reusing,
};
pub use grammar::{Grammar, GrammarCompiler, GrammarError, GrammarSpec};
pub use harmony::{Channel, HarmonyMarkers, HarmonySplitter};
pub use logprobs::{MAX_TOP_LOGPROBS, TokenLogprob};
pub use sampling::{Sampler, SamplingParams};
pub use scheduler::{Request, Scheduler, SchedulerConfig, SchedulerStats, Sink};
pub use session::{Checkpoint, Session};
pub use speculative::{DraftModel, DraftTokens, SpecStats, Speculate, SpeculateParams, Speculator};
pub use stop::StopMatcher;
pub use tools::{CallPiece, CallStream, Tool, ToolCall, ToolChoice, ToolError};
