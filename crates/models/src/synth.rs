//! Random-weight models shaped like real ones (`ollm synth --like NAME`): the real config.json,
//! tensor names and shapes, bf16 values small enough to keep activations finite, and a
//! byte-level tokenizer with the family's special tokens and chat template, so `run`, `bench` and
//! `plan` work on them without a 16 GB download.

use std::path::Path;

use ollm_tokenizer::tiktoken::O200K_PATTERN;
use ollm_weights::staging::{Staging, check_out_dir, write_json};
use ollm_weights::synth::{SynthTensor, write_shards_as};
use serde_json::{Map, Value, json};

use crate::common::tensors::synth_groups;
use crate::config::RawConfig;
use crate::{ModelError, Result};

/// The shapes `--like` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Like {
    Llama31_8B,
    Llama32_1B,
    Llama32_3B,
    GptOss20B,
    Qwen3Next80B,
}

impl Like {
    pub const NAMES: [&'static str; 5] =
        ["llama-3.1-8b", "llama-3.2-1b", "llama-3.2-3b", "gpt-oss-20b", "qwen3-next-80b"];

    /// Parses a `--like` value; unknown names list the known ones.
    pub fn parse(name: &str) -> std::result::Result<Self, String> {
        match name.to_ascii_lowercase().as_str() {
            "llama-3.1-8b" => Ok(Self::Llama31_8B),
            "llama-3.2-1b" => Ok(Self::Llama32_1B),
            "llama-3.2-3b" => Ok(Self::Llama32_3B),
            "gpt-oss-20b" => Ok(Self::GptOss20B),
            "qwen3-next-80b" => Ok(Self::Qwen3Next80B),
            other => Err(format!("unknown model shape '{other}'; choose one of {}", Self::NAMES.join(", "))),
        }
    }

    /// The released model's config.json (meta-llama/Llama-3.x, openai/gpt-oss on the hub).
    pub fn config(self) -> Value {
        // (hidden, intermediate, layers, heads, head_dim, tied, rope factor)
        let (h, i, l, nh, hd, tied, factor) = match self {
            Self::Llama31_8B => (4096, 14336, 32, 32, 128, false, 8.0),
            Self::Llama32_1B => (2048, 8192, 16, 32, 64, true, 32.0),
            Self::Llama32_3B => (3072, 8192, 28, 24, 128, true, 32.0),
            Self::GptOss20B => return gpt_oss_20b_config(),
            Self::Qwen3Next80B => return qwen3_next_80b_config(),
        };
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": h,
            "intermediate_size": i,
            "num_hidden_layers": l,
            "num_attention_heads": nh,
            "num_key_value_heads": 8,
            "head_dim": hd,
            "hidden_act": "silu",
            "vocab_size": 128256,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192
            },
            "attention_bias": false,
            "mlp_bias": false,
            "tie_word_embeddings": tied,
            "torch_dtype": "bfloat16",
            "bos_token_id": BOS,
            "eos_token_id": [END_OF_TEXT, EOM, EOT],
        })
    }
}

const BOS: u32 = 128000;
const END_OF_TEXT: u32 = 128001;
const START_HEADER: u32 = 128006;
const END_HEADER: u32 = 128007;
const EOM: u32 = 128008;
const EOT: u32 = 128009;

/// openai/gpt-oss-20b's config.json (MXFP4 experts).
fn gpt_oss_20b_config() -> Value {
    use crate::gpt_oss::tensors::{EMBED, LM_HEAD, Q, ROUTER};
    // The modules kept in bf16, named from the family's tensors: attention, router, embedding, head.
    let module = |name: &str| name.trim_end_matches(".weight").to_string();
    let attention = Q.split('.').next().unwrap_or_default();
    let not_converted = [
        format!("model.layers.*.{attention}"),
        format!("model.layers.*.{}", module(ROUTER)),
        module(EMBED),
        module(LM_HEAD),
    ];
    let layer_types: Vec<&str> =
        (0..24).map(|i| if i % 2 == 0 { "sliding_attention" } else { "full_attention" }).collect();
    json!({
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "attention_bias": true,
        "attention_dropout": 0.0,
        "bos_token_id": harmony::START_OF_TEXT,
        "eos_token_id": harmony::RETURN,
        "pad_token_id": harmony::END_OF_TEXT,
        "experts_per_token": 4,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 2880,
        "initial_context_length": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 2880,
        "layer_types": layer_types,
        "max_position_embeddings": 131072,
        "num_attention_heads": 64,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 24,
        "num_key_value_heads": 8,
        "num_local_experts": 32,
        "output_router_logits": false,
        "quantization_config": {
            "modules_to_not_convert": not_converted,
            "quant_method": "mxfp4"
        },
        "rms_norm_eps": 1e-5,
        "rope_scaling": {
            "beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
            "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": false
        },
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "use_cache": true,
        "vocab_size": 201088,
    })
}

/// Qwen/Qwen3-Next-80B-A3B-Instruct's config.json (docs/models.md §4.1): 48 layers, three Gated
/// DeltaNet layers to one gated-attention layer, 512 experts (top 10) and a shared expert.
fn qwen3_next_80b_config() -> Value {
    let layer_types: Vec<&str> =
        (0..48).map(|i| if (i + 1) % 4 == 0 { "full_attention" } else { "linear_attention" }).collect();
    json!({
        "architectures": ["Qwen3NextForCausalLM"],
        "model_type": "qwen3_next",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "decoder_sparse_step": 1,
        "full_attention_interval": 4,
        "head_dim": 256,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 5120,
        "layer_types": layer_types,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 32,
        "linear_value_head_dim": 128,
        "max_position_embeddings": 262144,
        "mlp_only_layers": [],
        "moe_intermediate_size": 512,
        "norm_topk_prob": true,
        "num_attention_heads": 16,
        "num_experts": 512,
        "num_experts_per_tok": 10,
        "num_hidden_layers": 48,
        "num_key_value_heads": 2,
        "partial_rotary_factor": 0.25,
        "rms_norm_eps": 1e-6,
        "rope_scaling": null,
        "rope_theta": 10000000,
        "shared_expert_intermediate_size": 512,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "use_cache": true,
        "vocab_size": 151936,
    })
}

/// Plans a Qwen3-Next model from `config`: the tensors of its table (`qwen3_next::tensors`),
/// routed experts one tensor per expert and matrix.
pub fn plan_qwen3_next(mut config: Value, layers: Option<usize>) -> Result<SynthPlan> {
    use crate::qwen3_next::tensors::{EXPERTS, GLOBAL, LAYER};
    set_layers(&mut config, layers)?;
    let raw = RawConfig::parse("synth config".into(), &config.to_string())?;
    let cfg = crate::qwen3_next::Qwen3NextConfig::from_raw(&raw)?;
    let experts = Some((EXPERTS.prefix, cfg.n_experts));
    let groups = synth_groups(&cfg, cfg.n_layers, (&GLOBAL[..1], &LAYER, &GLOBAL[1..]), experts);
    Ok(SynthPlan { config, shards: into_shards(groups) })
}

/// A byte-level tokenizer with Qwen's ChatML special tokens at their real ids (151,643 on), and
/// the ChatML template.
pub fn qwen_tokenizer_files() -> (Value, Value, Value) {
    const FIRST: u32 = 151_643;
    let named = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let specials: Vec<(u32, String)> = (FIRST..151_936)
        .map(|id| {
            (id, named.get((id - FIRST) as usize).map_or_else(|| format!("<|reserved_{id}|>"), |s| (*s).to_string()))
        })
        .collect();
    let tokenizer = byte_tokenizer(FIRST, &specials, None);
    let template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}\
                    {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let tokenizer_config = json!({
        "tokenizer_class": "Qwen2TokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 262144,
        "chat_template": template,
    });
    let generation = json!({"bos_token_id": 151643, "eos_token_id": [151645, 151643]});
    (tokenizer, tokenizer_config, generation)
}

/// Special tokens of the o200k_harmony encoding (GPT-OSS) at their real ids.
pub mod harmony {
    pub const START_OF_TEXT: u32 = 199998;
    pub const END_OF_TEXT: u32 = 199999;
    pub const RETURN: u32 = 200002;
    pub const CONSTRAIN: u32 = 200003;
    pub const CHANNEL: u32 = 200005;
    pub const START: u32 = 200006;
    pub const END: u32 = 200007;
    pub const MESSAGE: u32 = 200008;
    pub const CALL: u32 = 200012;
    pub const END_OF_PROMPT: u32 = 200018;
    /// Ids from here to the vocabulary's end (201,088) are special tokens.
    pub const FIRST_SPECIAL: u32 = START_OF_TEXT;
    pub const VOCAB: u32 = 201_088;
    /// (id, text) of the named special tokens; the others are `<|reserved_{id}|>`.
    pub const SPECIALS: [(u32, &str); 10] = [
        (START_OF_TEXT, "<|startoftext|>"),
        (END_OF_TEXT, "<|endoftext|>"),
        (RETURN, "<|return|>"),
        (CONSTRAIN, "<|constrain|>"),
        (CHANNEL, "<|channel|>"),
        (START, "<|start|>"),
        (END, "<|end|>"),
        (MESSAGE, "<|message|>"),
        (CALL, "<|call|>"),
        (END_OF_PROMPT, "<|endofprompt|>"),
    ];

    /// Every special token of o200k_harmony, (id, text), ids 199,998 .. 201,087.
    pub fn specials() -> Vec<(u32, String)> {
        (FIRST_SPECIAL..VOCAB)
            .map(|id| {
                let named = SPECIALS.iter().find(|(i, _)| *i == id).map(|(_, s)| (*s).to_string());
                (id, named.unwrap_or_else(|| format!("<|reserved_{id}|>")))
            })
            .collect()
    }
}

/// The real GPT-OSS tokenizer, o200k_harmony, from OpenAI's o200k_base vocabulary
/// (`o200k_base.tiktoken`'s text): its ranks, tiktoken's split and the harmony special tokens.
pub fn harmony_tokenizer_from_tiktoken(tiktoken_text: &str, source: &str) -> Result<Value> {
    let ranks = ollm_tokenizer::tiktoken::parse_ranks(tiktoken_text, source).map_err(|e| ModelError::Config {
        path: source.into(),
        field: "o200k_base".into(),
        detail: e.to_string(),
    })?;
    if ranks.len() != harmony::FIRST_SPECIAL as usize {
        return Err(ModelError::Config {
            path: source.into(),
            field: "o200k_base".into(),
            detail: format!(
                "{} ranks, o200k_base has {} (give OpenAI's o200k_base.tiktoken)",
                ranks.len(),
                harmony::FIRST_SPECIAL
            ),
        });
    }
    Ok(ollm_tokenizer::tiktoken::tokenizer_json(&ranks, O200K_PATTERN, &harmony::specials()))
}

/// What `synth` will write: the config (with `num_hidden_layers` overridden by `layers`) and the
/// tensors, grouped into shards of at most ~4 GiB that never split a layer.
#[derive(Debug)]
pub struct SynthPlan {
    pub config: Value,
    pub shards: Vec<Vec<SynthTensor>>,
}

impl SynthPlan {
    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().flatten().map(|t| t.planned.len_bytes()).sum()
    }
}

const SHARD_BYTES: u64 = 4 << 30;

fn field(config: &Value, name: &str) -> Result<usize> {
    config.get(name).and_then(Value::as_u64).map(|v| v as usize).ok_or_else(|| ModelError::Config {
        path: "synth config".into(),
        field: name.into(),
        detail: "missing or not a non-negative integer".into(),
    })
}

/// `--layers N`: sets `num_hidden_layers` (N ≥ 1) and repeats a `layer_types` list's pattern
/// to N entries.
fn set_layers(config: &mut Value, layers: Option<usize>) -> Result<()> {
    let Some(n) = layers else { return Ok(()) };
    if n == 0 {
        return Err(ModelError::Config {
            path: "synth".into(),
            field: "--layers".into(),
            detail: "must be at least 1".into(),
        });
    }
    config["num_hidden_layers"] = json!(n);
    if let Some(types) = config.get("layer_types").and_then(Value::as_array).cloned() {
        config["layer_types"] = json!(types.into_iter().cycle().take(n).collect::<Vec<_>>());
    }
    Ok(())
}

/// Plans a Llama-family model from `config` (a config.json value): the tensors of its table
/// (`llama3::tensors`).
pub fn plan_llama(mut config: Value, layers: Option<usize>) -> Result<SynthPlan> {
    use crate::llama3::tensors::{GLOBAL, LAYER};
    set_layers(&mut config, layers)?;
    let cfg = crate::llama3::LlamaConfig::from_raw(&RawConfig::parse("synth config".into(), &config.to_string())?)?;
    let groups = synth_groups(&cfg, cfg.n_layers, (&GLOBAL[..1], &LAYER, &GLOBAL[1..]), None);
    Ok(SynthPlan { config, shards: into_shards(groups) })
}

/// Plans a Gemma 3 text model from `config`: the tensors of its table (`gemma3::tensors`).
pub fn plan_gemma3(mut config: Value, layers: Option<usize>) -> Result<SynthPlan> {
    use crate::gemma3::tensors::{GLOBAL, LAYER};
    set_layers(&mut config, layers)?;
    let cfg = crate::gemma3::Gemma3Config::from_raw(&RawConfig::parse("synth config".into(), &config.to_string())?)?;
    let groups = synth_groups(&cfg, cfg.n_layers, (&GLOBAL[..1], &LAYER, &GLOBAL[1..]), None);
    Ok(SynthPlan { config, shards: into_shards(groups) })
}

/// Plans a GPT-OSS model from `config`: the tensors of its table (`gpt_oss::tensors`): bf16
/// attention, router, norms, sinks and biases; MXFP4 experts.
pub fn plan_gpt_oss(mut config: Value, layers: Option<usize>) -> Result<SynthPlan> {
    use crate::gpt_oss::tensors::{GLOBAL, LAYER};
    set_layers(&mut config, layers)?;
    let f = |n: &str| field(&config, n);
    let (h, i) = (f("hidden_size")?, f("intermediate_size")?);
    if h % 32 != 0 || i % 32 != 0 {
        return Err(ModelError::Config {
            path: "synth config".into(),
            field: "hidden_size".into(),
            detail: format!("MXFP4 experts need hidden_size ({h}) and intermediate_size ({i}) divisible by 32"),
        });
    }
    let cfg = crate::gpt_oss::GptOssConfig::from_raw(&RawConfig::parse("synth config".into(), &config.to_string())?)?;
    let groups = synth_groups(&cfg, cfg.n_layers, (&GLOBAL[..1], &LAYER, &GLOBAL[1..]), None);
    Ok(SynthPlan { config, shards: into_shards(groups) })
}

/// Groups of tensors (one layer each) into shards of at most ~4 GiB that never split a group.
fn into_shards(groups: Vec<Vec<SynthTensor>>) -> Vec<Vec<SynthTensor>> {
    let mut shards: Vec<Vec<SynthTensor>> = vec![Vec::new()];
    let mut bytes = 0u64;
    for g in groups {
        let gb: u64 = g.iter().map(|t| t.planned.len_bytes()).sum();
        if bytes > 0 && bytes + gb > SHARD_BYTES {
            shards.push(Vec::new());
            bytes = 0;
        }
        bytes += gb;
        if let Some(s) = shards.last_mut() {
            s.extend(g);
        }
    }
    shards
}

/// A byte-level tokenizer for GPT-OSS shapes: bytes 0..255 as for Llama, fillers up to the
/// o200k_harmony specials at their real ids, the harmony chat format as its template.
pub fn harmony_tokenizer_files() -> (Value, Value, Value) {
    let mut tokenizer = byte_tokenizer(harmony::FIRST_SPECIAL, &harmony::specials(), None);
    // o200k_harmony's pre-tokenizer: its split, then bytes to characters.
    tokenizer["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": O200K_PATTERN}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
    ]});
    // The template goes in chat_template.jinja, as in the released checkpoints.
    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|return|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 131072,
    });
    let generation = json!({
        "bos_token_id": harmony::START_OF_TEXT,
        "eos_token_id": [harmony::RETURN, harmony::END_OF_TEXT, harmony::CALL],
        "pad_token_id": harmony::END_OF_TEXT,
    });
    (tokenizer, tokenizer_config, generation)
}

/// The chat template published with openai/gpt-oss-20b and -120b (Apache-2.0), as the real
/// checkpoints ship it in chat_template.jinja: the harmony format.
pub const HARMONY_TEMPLATE: &str = include_str!("../../../fixtures/harmony/chat_template.jinja");

/// A byte-level BPE tokenizer (no merges: one token per byte, ids 0..255; reserved fillers up
/// to `first_special`), the special tokens `specials` (id, text) from `first_special` to the
/// vocabulary's end, and, with `bos`, a post-processor that prepends it.
fn byte_tokenizer(first_special: u32, specials: &[(u32, String)], bos: Option<(u32, &str)>) -> Value {
    let chars = ollm_tokenizer::tiktoken::byte_chars();
    let mut vocab = Map::new();
    for (b, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), json!(b));
    }
    for id in 256..first_special {
        vocab.insert(format!("<|filler_{id}|>"), json!(id));
    }
    let mut added = Vec::new();
    for (id, content) in specials {
        vocab.insert(content.clone(), json!(id));
        added.push(json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}));
    }
    let post_processor = bos.map_or(Value::Null, |(id, text)| {
        json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {text: {"id": text, "ids": [id], "tokens": [text]}}})
    });
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": Value::Object(vocab), "merges": []},
    })
}

/// The byte-level tokenizer with Llama-3's special tokens at their real ids, and its chat
/// template.
pub fn llama3_tokenizer_files() -> (Value, Value, Value) {
    let specials = [
        (BOS, "<|begin_of_text|>"),
        (END_OF_TEXT, "<|end_of_text|>"),
        (START_HEADER, "<|start_header_id|>"),
        (END_HEADER, "<|end_header_id|>"),
        (EOM, "<|eom_id|>"),
        (EOT, "<|eot_id|>"),
    ];
    let specials: Vec<(u32, String)> = (BOS..BOS + 256)
        .map(|id| {
            let named = specials.iter().find(|(i, _)| *i == id).map(|(_, s)| (*s).to_string());
            (id, named.unwrap_or_else(|| format!("<|reserved_special_token_{}|>", id - BOS)))
        })
        .collect();
    let tokenizer = byte_tokenizer(BOS, &specials, Some((BOS, "<|begin_of_text|>")));
    let template = "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n\
                    {{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}\
                    <|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";
    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "clean_up_tokenization_spaces": true,
        "model_max_length": 131072,
        "chat_template": template,
    });
    let generation = json!({"bos_token_id": BOS, "eos_token_id": [END_OF_TEXT, EOM, EOT]});
    (tokenizer, tokenizer_config, generation)
}

/// Writes a model shaped like `like` (with `layers` layers if given) into the new directory
/// `out` through a staging directory; `progress(done, total)` gets weight bytes written.
pub fn synth(
    like: Like,
    layers: Option<usize>,
    out: &Path,
    seed: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    check_out_dir(out)?;
    write_plan(&plan_like(like, layers)?, out, seed, progress)
}

/// The plan of a model shaped like `like` (with `layers` layers if given).
pub fn plan_like(like: Like, layers: Option<usize>) -> Result<SynthPlan> {
    plan_like_config(like, like.config(), layers)
}

/// The plan of a model of `like`'s family with `config` (its [`Like::config`], some fields
/// changed: a real shape shrunk for tests).
pub fn plan_like_config(like: Like, config: Value, layers: Option<usize>) -> Result<SynthPlan> {
    match like {
        Like::GptOss20B => plan_gpt_oss(config, layers),
        Like::Qwen3Next80B => plan_qwen3_next(config, layers),
        _ => plan_llama(config, layers),
    }
}

/// config.json's marker of a model written by [`synth_headers`]: the loader refuses it.
pub const HEADERS_ONLY_KEY: &str = "ollm_headers_only";

/// Writes a model shaped like `like` whose safetensors files hold headers only (the data are
/// sparse holes, no disk space): `ollm plan` reads it as it would the real model, the loader
/// refuses it. For planning models larger than the disk.
pub fn synth_headers(like: Like, layers: Option<usize>, out: &Path) -> Result<()> {
    let mut plan = plan_like(like, layers)?;
    plan.config[HEADERS_ONLY_KEY] = json!(true);
    write_plan_as(&plan, out, None, &mut |_, _| {})
}

/// Writes a planned model (config, tokenizer, weights) into `out`.
pub fn write_plan(plan: &SynthPlan, out: &Path, seed: u64, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
    write_plan_as(plan, out, Some(seed), progress)
}

fn write_plan_as(plan: &SynthPlan, out: &Path, seed: Option<u64>, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
    check_out_dir(out)?;
    let staging = Staging::create(out, "synth")?;
    let model_type = plan.config.get("model_type").and_then(Value::as_str);
    let gpt_oss = model_type == Some("gpt_oss");
    let (tokenizer, tokenizer_config, generation) = match model_type {
        Some("gpt_oss") => harmony_tokenizer_files(),
        Some("qwen3_next") => qwen_tokenizer_files(),
        _ => llama3_tokenizer_files(),
    };
    write_json(&staging.path().join("config.json"), &plan.config)?;
    write_json(&staging.path().join("tokenizer.json"), &tokenizer)?;
    write_json(&staging.path().join("tokenizer_config.json"), &tokenizer_config)?;
    write_json(&staging.path().join("generation_config.json"), &generation)?;
    if gpt_oss {
        let path = staging.path().join("chat_template.jinja");
        std::fs::write(&path, HARMONY_TEMPLATE).map_err(|source| ollm_weights::WeightsError::Write { path, source })?;
    }
    write_shards_as(staging.path(), &plan.shards, seed, progress)?;
    staging.commit(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(plan: &SynthPlan) -> u64 {
        plan.total_bytes() / 2
    }

    #[test]
    fn plans_have_the_released_parameter_counts() {
        // Parameter counts of the released checkpoints.
        assert_eq!(params(&plan_llama(Like::Llama31_8B.config(), None).expect("8b")), 8_030_261_248);
        assert_eq!(params(&plan_llama(Like::Llama32_1B.config(), None).expect("1b")), 1_235_814_400);
        assert_eq!(params(&plan_llama(Like::Llama32_3B.config(), None).expect("3b")), 3_212_749_824);
        // gpt-oss-20b as released: 20.9 B parameters, 12.8 GiB with MXFP4 experts.
        let oss = plan_gpt_oss(Like::GptOss20B.config(), None).expect("20b");
        let bytes = oss.total_bytes();
        assert!((13_700_000_000..13_800_000_000).contains(&bytes), "{bytes}");
        let cut = plan_gpt_oss(Like::GptOss20B.config(), Some(3)).expect("3 layers");
        assert_eq!(cut.config["layer_types"].as_array().map(Vec::len), Some(3));
    }

    #[test]
    fn shards_hold_whole_layers_and_layers_override() {
        let plan = plan_llama(Like::Llama31_8B.config(), Some(3)).expect("plan");
        assert_eq!(plan.config["num_hidden_layers"], 3);
        let names: Vec<&str> = plan.shards.iter().flatten().map(|t| t.planned.name.as_str()).collect();
        assert_eq!(names.len(), 1 + 3 * 9 + 2);
        for shard in &plan.shards {
            assert!(shard.iter().map(|t| t.planned.len_bytes()).sum::<u64>() <= SHARD_BYTES);
        }
        // Every layer's tensors sit in one shard.
        for l in 0..3 {
            let prefix = format!("model.layers.{l}.");
            let holding = plan.shards.iter().filter(|s| s.iter().any(|t| t.planned.name.starts_with(&prefix))).count();
            assert_eq!(holding, 1, "layer {l}");
        }
        assert!(plan_llama(Like::Llama32_1B.config(), Some(0)).is_err());
        assert!(Like::parse("llama-9").expect_err("unknown").contains("llama-3.1-8b"));
    }
}
