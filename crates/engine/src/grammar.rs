//! Constrained decoding: at each step the sampler sees only the tokens a grammar allows, and the
//! grammar advances with every accepted token. The grammar engine is `llguidance` (the library
//! llama.cpp and vLLM use): it compiles JSON schemas, Lark grammars and regexes against the
//! tokenizer's vocabulary (as token bytes) and computes a token mask per step.
//!
//! [`GrammarCompiler`] is built once per tokenizer (it walks the whole vocabulary into a trie) and
//! is shared; [`GrammarCompiler::compile`] turns a [`GrammarSpec`] into a [`Grammar`] — one
//! sequence's matcher, cloned fresh for each sequence that uses it.

use std::sync::Arc;
use std::time::Duration;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use ollm_tokenizer::Tokenizer;

/// What the output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON value valid against this JSON schema.
    JsonSchema(serde_json::Value),
    /// A grammar in llguidance's Lark syntax.
    Lark(String),
    /// A regular expression (Rust regex syntax) the whole output matches.
    Regex(String),
}

impl GrammarSpec {
    fn to_top_level(&self) -> TopLevelGrammar {
        match self {
            GrammarSpec::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"})))
            }
            GrammarSpec::JsonSchema(s) => TopLevelGrammar::from_json_schema(compact(s.clone())),
            GrammarSpec::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
            GrammarSpec::Regex(r) => TopLevelGrammar::from_regex(r),
        }
    }

    /// What the grammar is, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            GrammarSpec::JsonObject => "json_object",
            GrammarSpec::JsonSchema(_) => "JSON schema",
            GrammarSpec::Lark(_) => "Lark grammar",
            GrammarSpec::Regex(_) => "regex",
        }
    }
}

/// JSON is written compactly (no whitespace between tokens: `{"a":1,"b":[2]}`), so a model
/// cannot spend its tokens on blanks; a schema that carries its own llguidance options
/// (`"x-guidance": {...}`) keeps them.
fn compact(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(o) = schema.as_object_mut()
        && !o.contains_key("x-guidance")
    {
        o.insert("x-guidance".into(), serde_json::json!({"whitespace_flexible": false}));
    }
    schema
}

/// Why a grammar cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    #[error("{path}: cannot read the vocabulary for constrained decoding: {detail}")]
    Vocabulary { path: std::path::PathBuf, detail: String },

    #[error("the {kind} cannot be compiled: {detail}")]
    Compile { kind: &'static str, detail: String },

    #[error("the grammar cannot compute the next token mask: {detail}")]
    Mask { detail: String },

    #[error("the grammar rejected token {token}: {detail}")]
    Advance { token: u32, detail: String },
}

/// The tokenizer's vocabulary made into llguidance's trie; compiles grammars. Cheap to clone.
#[derive(Clone)]
pub struct GrammarCompiler {
    factory: Arc<ParserFactory>,
    /// Token ids that end a sequence: llguidance knows one (the first); a mask that allows it
    /// allows them all.
    eos: Vec<u32>,
    vocab_size: usize,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler").field("eos", &self.eos).field("vocab_size", &self.vocab_size).finish()
    }
}

impl GrammarCompiler {
    /// Reads the token bytes of `tokenizer`'s tokenizer.json (byte-level or byte-fallback BPE).
    /// `eos`: the ids that end generation; `model_vocab`: the model's logits row length (may
    /// exceed the tokenizer's; the extra ids are never allowed).
    pub fn new(tokenizer: &Tokenizer, eos: &[u32], model_vocab: usize) -> Result<Self, GrammarError> {
        let path = tokenizer.path();
        let bad = |detail: String| GrammarError::Vocabulary { path: path.to_path_buf(), detail };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| bad(e.to_string()))?;
        let vocab_size = words.len().max(model_vocab).max(tokenizer.vocab_size());
        words.resize(vocab_size, Vec::new());
        let tok_eos = eos.first().copied().unwrap_or(0);
        let info = TokRxInfo::new(vocab_size as u32, tok_eos);
        let trie = TokTrie::from(&info, &words);
        let env = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory =
            ParserFactory::new_simple(&(env as llguidance::toktrie::TokEnv)).map_err(|e| bad(e.to_string()))?;
        factory.quiet();
        Ok(Self { factory: Arc::new(factory), eos: eos.to_vec(), vocab_size })
    }

    /// The bytes token `id` stands for (a special token's text; empty for an id beyond the
    /// vocabulary): exact even where a token holds part of a UTF-8 character.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        if id as usize >= self.vocab_size {
            return Vec::new();
        }
        self.factory.tok_env().tok_trie().decode(&[id])
    }

    /// Compiles `spec`; an error names the kind of grammar and what the library said.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Grammar, GrammarError> {
        let compile_err = |detail: String| GrammarError::Compile { kind: spec.kind(), detail };
        let parser = self.factory.create_parser(spec.to_top_level()).map_err(|e| compile_err(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(compile_err(e));
        }
        Ok(Grammar { matcher, eos: self.eos.clone(), mask: None, mask_time: Duration::ZERO, steps: 0 })
    }
}

/// One sequence's grammar state. Clone it before its first token to start another sequence
/// on the same grammar.
#[derive(Clone)]
pub struct Grammar {
    matcher: Matcher,
    eos: Vec<u32>,
    /// The mask for the current step, computed once and kept until a token is accepted.
    mask: Option<SimpleVob>,
    mask_time: Duration,
    steps: usize,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar").field("steps", &self.steps).field("mask_time", &self.mask_time).finish()
    }
}

impl Grammar {
    fn mask(&mut self) -> Result<&SimpleVob, GrammarError> {
        if self.mask.is_none() {
            let t = std::time::Instant::now();
            let m = self.matcher.compute_mask().map_err(|e| GrammarError::Mask { detail: e.to_string() })?;
            self.mask_time += t.elapsed();
            self.steps += 1;
            self.mask = Some(m);
        }
        self.mask.as_ref().ok_or(GrammarError::Mask { detail: "no mask".into() })
    }

    fn eos_allowed(mask: &SimpleVob, eos: &[u32]) -> bool {
        eos.iter().any(|&e| (e as usize) < mask.len() && mask.is_allowed(e))
    }

    /// Sets every logit the grammar forbids in this step to -inf (eos ids only where the grammar
    /// may end; ids beyond the vocabulary never).
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<(), GrammarError> {
        let eos = self.eos.clone();
        let mask = self.mask()?;
        let end_ok = Self::eos_allowed(mask, &eos);
        for (i, l) in logits.iter_mut().enumerate() {
            let ok = if eos.contains(&(i as u32)) { end_ok } else { i < mask.len() && mask.is_allowed(i as u32) };
            if !ok {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Whether the grammar allows `token` as the next one: the hook speculative decoding uses to
    /// reject a drafted token before verification (computes this step's mask if needed).
    pub fn allows(&mut self, token: u32) -> Result<bool, GrammarError> {
        let eos = self.eos.clone();
        let mask = self.mask()?;
        Ok(if eos.contains(&token) {
            Self::eos_allowed(mask, &eos)
        } else {
            (token as usize) < mask.len() && mask.is_allowed(token)
        })
    }

    /// How many leading tokens of `tokens` the grammar accepts in a row, without advancing.
    pub fn allowed_prefix(&mut self, tokens: &[u32]) -> Result<usize, GrammarError> {
        let end = tokens.iter().position(|t| self.eos.contains(t)).unwrap_or(tokens.len());
        let n =
            self.matcher.validate_tokens(&tokens[..end]).map_err(|e| GrammarError::Mask { detail: e.to_string() })?;
        // An eos right after the allowed tokens counts when the grammar may end there.
        if n == end && end < tokens.len() {
            let mut probe = self.matcher.clone();
            probe
                .consume_tokens(&tokens[..end])
                .map_err(|e| GrammarError::Advance { token: tokens[0], detail: e.to_string() })?;
            if probe.is_accepting().unwrap_or(false) {
                return Ok(end + 1);
            }
        }
        Ok(n)
    }

    /// Advances the grammar with an accepted token (not an eos).
    pub fn accept(&mut self, token: u32) -> Result<(), GrammarError> {
        self.mask = None;
        self.matcher.consume_token(token).map_err(|e| GrammarError::Advance { token, detail: e.to_string() })
    }

    /// Whether `token` ends a sequence (it is never accepted into the grammar).
    pub fn is_eos(&self, token: u32) -> bool {
        self.eos.contains(&token)
    }

    /// The grammar is complete and allows nothing more: the sequence ends here.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Time spent computing masks and the number of masks computed.
    pub fn mask_stats(&self) -> (Duration, usize) {
        (self.mask_time, self.steps)
    }
}
