//! Hugging Face tokenizer files from GGUF `tokenizer.ggml.*` metadata: byte-level BPE
//! (`tokenizer.ggml.model` "gpt2"), and Gemma's SentencePiece vocabulary ("llama" in a `gemma3`
//! file; see [`gemma_tokenizer_json`]).
//!
//! The pre-tokenizer is chosen by `tokenizer.ggml.pre` and spelled exactly as the model's own
//! Hugging Face tokenizer.json spells it, so the `tokenizers` library splits text the same way:
//! * `smollm` (SmolLM/SmolLM2, StarCoder-style): `Digits(individual_digits)` then `ByteLevel`
//!   with its built-in GPT-2 regex. llama.cpp's equivalent is the regex pair `\p{N}` + GPT-2.
//! * `llama-bpe` (Llama-3.x; aliases `llama3`, `llama-v3`): `Split(llama-3 regex, Isolated)` then
//!   `ByteLevel` without regex; the BPE model has `ignore_merges: true` (a pre-token that is
//!   itself in the vocabulary is not merged piecewise; llama.cpp does the same for LLAMA3).
//! * `gpt2`: `ByteLevel` with its built-in GPT-2 regex.
//! * `qwen2` (Qwen2/2.5/3; alias `deepseek-r1-qwen`): `Split(Qwen2 regex, Isolated)` then
//!   `ByteLevel` without regex, after an NFC normalizer, as Qwen's tokenizer.json.

use serde_json::{Map, Value, json};

use super::metadata::Metadata;
use crate::Result;

/// Llama-3's split regex, as in Meta-Llama-3's tokenizer.json (and llama.cpp's LLAMA3 pre-type).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's split regex (Qwen2/2.5/3's tokenizer.json): Llama-3's with single digits.
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const SUPPORTED_PRE: &str = "smollm, llama-bpe (also spelled llama3, llama-v3), qwen2 (also deepseek-r1-qwen), gpt2";

/// `tokenizer.ggml.token_type` values that become added tokens.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The three JSON files written next to the weights.
#[derive(Debug, Clone)]
pub struct TokenizerFiles {
    pub tokenizer_json: Value,
    pub tokenizer_config_json: Value,
    pub generation_config_json: Value,
}

/// Special token ids from `tokenizer.ggml.*_token_id`, each checked against the vocabulary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    /// End of turn (Llama-3 `<|eot_id|>`), when the file names one.
    pub eot: Option<u32>,
    /// End of message (Llama-3.1 `<|eom_id|>`).
    pub eom: Option<u32>,
}

impl SpecialIds {
    /// Ids that end generation: eos, eot, eom, without repeats.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = Vec::new();
        for id in [self.eos, self.eot, self.eom].into_iter().flatten() {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }
}

/// Reads the special ids; `n_vocab` bounds them.
pub fn special_ids(meta: &Metadata, n_vocab: usize) -> Result<SpecialIds> {
    let id = |name: &str| -> Result<Option<u32>> {
        let key = format!("tokenizer.ggml.{name}_token_id");
        match meta.opt_u64(&key)? {
            None => Ok(None),
            Some(v) if (v as usize) < n_vocab => Ok(Some(v as u32)),
            Some(v) => Err(meta.err(&key, format!("id {v} is outside the vocabulary of {n_vocab} tokens"))),
        }
    };
    Ok(SpecialIds {
        bos: id("bos")?,
        eos: id("eos")?,
        unk: id("unknown")?,
        pad: id("padding")?,
        eot: id("eot")?,
        eom: id("eom")?,
    })
}

/// How one `tokenizer.ggml.pre` value is spelled in a tokenizer.json.
struct PreTokenizer {
    json: Value,
    normalizer: Value,
    ignore_merges: bool,
    /// llama.cpp's default for `add_bos_token` when the key is missing.
    default_add_bos: bool,
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn pre_tokenizer(meta: &Metadata) -> Result<PreTokenizer> {
    let key = "tokenizer.ggml.pre";
    let pre = meta.opt_str(key)?.ok_or_else(|| {
        meta.err(key, format!("missing; ollm needs it to pick the pre-tokenizer (supported: {SUPPORTED_PRE})"))
    })?;
    Ok(match pre {
        "smollm" => PreTokenizer {
            json: json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]}),
            normalizer: Value::Null,
            ignore_merges: false,
            default_add_bos: false,
        },
        "llama-bpe" | "llama3" | "llama-v3" => PreTokenizer {
            json: json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": false},
                byte_level(false),
            ]}),
            normalizer: Value::Null,
            ignore_merges: true,
            default_add_bos: true,
        },
        "qwen2" | "deepseek-r1-qwen" => PreTokenizer {
            json: json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": false},
                byte_level(false),
            ]}),
            normalizer: json!({"type": "NFC"}),
            ignore_merges: false,
            default_add_bos: false,
        },
        "gpt2" => PreTokenizer {
            json: byte_level(true),
            normalizer: Value::Null,
            ignore_merges: false,
            default_add_bos: false,
        },
        other => {
            return Err(meta.err(key, format!("pre-tokenizer '{other}' is not supported (supported: {SUPPORTED_PRE})")));
        }
    })
}

/// Which tokenizer a file's `tokenizer.ggml.model` (and architecture) describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// "gpt2": byte-level BPE with merges.
    ByteLevel,
    /// "llama" in a `gemma3` file: Gemma's SentencePiece vocabulary, no merges.
    Gemma,
}

fn kind(meta: &Metadata) -> Result<Kind> {
    let model = meta.str("tokenizer.ggml.model")?;
    let arch = meta.opt_str("general.architecture")?.unwrap_or_default();
    match (model, arch) {
        ("gpt2", _) => Ok(Kind::ByteLevel),
        ("llama", "gemma3") => Ok(Kind::Gemma),
        _ => Err(meta.err(
            "tokenizer.ggml.model",
            format!(
                "tokenizer model '{model}' is not supported for architecture '{arch}' (supported: gpt2, i.e. byte-level BPE; llama in gemma3 files)"
            ),
        )),
    }
}

/// The vocabulary, checked non-empty.
fn tokens(meta: &Metadata) -> Result<Vec<&str>> {
    let key = "tokenizer.ggml.tokens";
    let tokens = meta.opt_str_array(key)?.ok_or_else(|| meta.err(key, "missing"))?;
    if tokens.is_empty() {
        return Err(meta.err(key, "the vocabulary is empty"));
    }
    Ok(tokens)
}

/// The BPE model: vocab (token → id) and merges as pairs.
fn bpe_model(meta: &Metadata, tokens: &[&str], ignore_merges: bool) -> Result<Value> {
    let mut vocab = Map::with_capacity(tokens.len());
    for (id, tok) in tokens.iter().enumerate() {
        if let Some(first) = vocab.insert(tok.to_string(), json!(id)) {
            return Err(meta.err(
                "tokenizer.ggml.tokens",
                format!("token {tok:?} appears at ids {first} and {id}; a tokenizer.json vocabulary cannot hold both"),
            ));
        }
    }
    let key = "tokenizer.ggml.merges";
    let merges = meta.opt_str_array(key)?.ok_or_else(|| meta.err(key, "missing (byte-level BPE needs its merges)"))?;
    let mut pairs = Vec::with_capacity(merges.len());
    for (i, merge) in merges.iter().enumerate() {
        // Byte-level tokens never contain a space (it is spelled 'Ġ'), so one space separates.
        let mut parts = merge.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => pairs.push(json!([a, b])),
            _ => return Err(meta.err(key, format!("merge {i} {merge:?} is not two tokens separated by one space"))),
        }
    }
    Ok(json!({
        "type": "BPE",
        "dropout": null,
        "unk_token": null,
        "continuing_subword_prefix": null,
        "end_of_word_suffix": null,
        "fuse_unk": false,
        "byte_fallback": false,
        "ignore_merges": ignore_merges,
        "vocab": vocab,
        "merges": pairs,
    }))
}

/// Control (special) and user-defined tokens, as tokenizer.json `added_tokens`. Without
/// `token_type`, the special ids are the added tokens.
fn added_tokens(meta: &Metadata, tokens: &[&str], special: &SpecialIds) -> Result<Vec<Value>> {
    let entry = |id: usize, is_special: bool| {
        json!({"id": id, "content": tokens[id], "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": is_special})
    };
    let key = "tokenizer.ggml.token_type";
    match meta.opt_i64_array(key)? {
        Some(types) => {
            if types.len() != tokens.len() {
                return Err(meta.err(key, format!("has {} entries for {} tokens", types.len(), tokens.len())));
            }
            Ok(types
                .iter()
                .enumerate()
                .filter(|&(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
                .map(|(id, &t)| entry(id, t == TOKEN_TYPE_CONTROL))
                .collect())
        }
        None => {
            let mut ids: Vec<u32> = [special.bos, special.eos, special.unk, special.pad, special.eot, special.eom]
                .into_iter()
                .flatten()
                .collect();
            ids.sort_unstable();
            ids.dedup();
            Ok(ids.into_iter().map(|id| entry(id as usize, true)).collect())
        }
    }
}

/// `[BOS] $A [EOS]` (each only when the file asks for it), as Llama-3's tokenizer.json: a
/// Sequence of ByteLevel (offsets only) and TemplateProcessing.
fn post_processor(tokens: &[&str], bos: Option<u32>, eos: Option<u32>) -> Value {
    let special = |id: u32, type_id: u32| json!({"SpecialToken": {"id": tokens[id as usize], "type_id": type_id}});
    let seq = |name: &str, type_id: u32| json!({"Sequence": {"id": name, "type_id": type_id}});
    let (mut single, mut pair) = (Vec::new(), Vec::new());
    let mut specials = Map::new();
    for (part, type_id) in [("A", 0u32), ("B", 1u32)] {
        let mut piece = Vec::new();
        if let Some(b) = bos {
            piece.push(special(b, type_id));
        }
        piece.push(seq(part, type_id));
        if let Some(e) = eos {
            piece.push(special(e, type_id));
        }
        if part == "A" {
            single.extend(piece.iter().cloned());
        }
        pair.extend(piece);
    }
    for id in [bos, eos].into_iter().flatten() {
        let tok = tokens[id as usize];
        specials.insert(tok.to_string(), json!({"id": tok, "ids": [id], "tokens": [tok]}));
    }
    json!({"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials},
    ]})
}

/// Gemma's tokenizer.json from a SentencePiece vocabulary (`tokens`, `token_type`; the file
/// has no merges), laid out as transformers builds it from the same file: a BPE model with byte
/// fallback over the vocabulary, spaces normalised to '▁' (no prefix space), control tokens as
/// special added tokens and user-defined ones as plain added tokens. The merges are every split
/// of a token into two tokens, best first: earlier tokens first (Gemma's file order is its merge
/// order, its scores are not), and within a token the longer left piece first. A token of
/// spaces only is stored with real spaces and spelled with '▁' here, as the normaliser makes
/// the text.
fn gemma_tokenizer_json(meta: &Metadata, raw: &[&str], (bos, eos): (Option<u32>, Option<u32>)) -> Result<Value> {
    let key = "tokenizer.ggml.token_type";
    let types = meta.opt_i64_array(key)?.ok_or_else(|| meta.err(key, "missing (Gemma's vocabulary needs it)"))?;
    if types.len() != raw.len() {
        return Err(meta.err(key, format!("has {} entries for {} tokens", types.len(), raw.len())));
    }
    let spaces_only = |t: &str| !t.is_empty() && t.chars().all(|c| c == ' ');
    let tokens: Vec<String> =
        raw.iter().map(|t| if spaces_only(t) { "▁".repeat(t.chars().count()) } else { t.to_string() }).collect();
    let mut ids: std::collections::HashMap<&str, usize> = std::collections::HashMap::with_capacity(tokens.len());
    let mut vocab = Map::with_capacity(tokens.len());
    for (id, tok) in tokens.iter().enumerate() {
        if let Some(first) = ids.insert(tok.as_str(), id) {
            return Err(meta.err(
                "tokenizer.ggml.tokens",
                format!("token {tok:?} appears at ids {first} and {id}; a tokenizer.json vocabulary cannot hold both"),
            ));
        }
        vocab.insert(tok.clone(), json!(id));
    }
    // Every split of each token into two tokens: tokens in file order, each one's splits with
    // the longer left piece first.
    let mut merges = Vec::new();
    for tok in &tokens {
        let cuts: Vec<usize> = tok.char_indices().map(|(i, _)| i).skip(1).collect();
        for &cut in cuts.iter().rev() {
            let (l, r) = tok.split_at(cut);
            if ids.contains_key(l) && ids.contains_key(r) {
                merges.push(json!([l, r]));
            }
        }
    }
    let entry = |id: usize, content: &str, special: bool| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": special})
    };
    let added: Vec<Value> = types
        .iter()
        .enumerate()
        .filter_map(|(id, &t)| match t {
            TOKEN_TYPE_CONTROL => Some(entry(id, &tokens[id], true)),
            // A user-defined token of spaces only is matched by the model as '▁'s, not as added text.
            TOKEN_TYPE_USER_DEFINED if !spaces_only(raw[id]) => Some(entry(id, &tokens[id], false)),
            _ => None,
        })
        .collect();
    let unk = match meta.opt_u64("tokenizer.ggml.unknown_token_id")? {
        Some(id) if (id as usize) < tokens.len() => json!(tokens[id as usize]),
        _ => Value::Null,
    };
    let text: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let processors = post_processor(&text, bos, eos);
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false},
        // The template part only: byte-level offsets mean nothing to this vocabulary.
        "post_processor": processors["processors"][1],
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    }))
}

/// Builds tokenizer.json, tokenizer_config.json and generation_config.json.
/// `model_max_length` is the context length (`<arch>.context_length`).
pub fn tokenizer_files(meta: &Metadata, model_max_length: Option<u64>) -> Result<TokenizerFiles> {
    let kind = kind(meta)?;
    let tokens = tokens(meta)?;
    let special = special_ids(meta, tokens.len())?;
    let default_add_bos = match kind {
        Kind::ByteLevel => pre_tokenizer(meta)?.default_add_bos,
        // llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
        Kind::Gemma => true,
    };
    let add_bos = meta.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(default_add_bos);
    let add_eos = meta.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let need =
        |flag: bool, id: Option<u32>, what: &str| -> Result<Option<u32>> {
            match (flag, id) {
                (false, _) => Ok(None),
                (true, Some(id)) => Ok(Some(id)),
                (true, None) => Err(meta
                    .err(&format!("tokenizer.ggml.{what}_token_id"), format!("missing, but add_{what}_token is true"))),
            }
        };
    let (bos_added, eos_added) = (need(add_bos, special.bos, "bos")?, need(add_eos, special.eos, "eos")?);

    let tokenizer_json = match kind {
        Kind::ByteLevel => {
            let pre = pre_tokenizer(meta)?;
            let model = bpe_model(meta, &tokens, pre.ignore_merges)?;
            json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added_tokens(meta, &tokens, &special)?,
                "normalizer": pre.normalizer,
                "pre_tokenizer": pre.json,
                "post_processor": post_processor(&tokens, bos_added, eos_added),
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": model,
            })
        }
        Kind::Gemma => gemma_tokenizer_json(meta, &tokens, (bos_added, eos_added))?,
    };

    let text = |id: Option<u32>| id.map_or(Value::Null, |i| json!(tokens[i as usize]));
    let mut config = Map::new();
    let class = if kind == Kind::Gemma { "GemmaTokenizer" } else { "PreTrainedTokenizerFast" };
    config.insert("tokenizer_class".into(), json!(class));
    config.insert("add_bos_token".into(), json!(add_bos));
    config.insert("add_eos_token".into(), json!(add_eos));
    config.insert("bos_token".into(), text(special.bos));
    config.insert("eos_token".into(), text(special.eos));
    if special.unk.is_some() {
        config.insert("unk_token".into(), text(special.unk));
    }
    if special.pad.is_some() {
        config.insert("pad_token".into(), text(special.pad));
    }
    config.insert("clean_up_tokenization_spaces".into(), json!(false));
    if let Some(n) = model_max_length {
        config.insert("model_max_length".into(), json!(n));
    }
    if let Some(template) = meta.opt_str("tokenizer.chat_template")? {
        config.insert("chat_template".into(), json!(template));
    }

    let mut generation = Map::new();
    if let Some(bos) = special.bos {
        generation.insert("bos_token_id".into(), json!(bos));
    }
    match special.stop_ids().as_slice() {
        [] => {}
        [one] => _ = generation.insert("eos_token_id".into(), json!(one)),
        many => _ = generation.insert("eos_token_id".into(), json!(many)),
    }
    if let Some(pad) = special.pad {
        generation.insert("pad_token_id".into(), json!(pad));
    }

    Ok(TokenizerFiles {
        tokenizer_json,
        tokenizer_config_json: Value::Object(config),
        generation_config_json: Value::Object(generation),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::super::metadata::{MetaValue, ValueType};
    use super::*;

    fn strs(items: &[&str]) -> MetaValue {
        MetaValue::Array {
            elem_type: ValueType::String,
            items: items.iter().map(|s| MetaValue::String(s.to_string())).collect(),
        }
    }

    fn meta(pre: &str, extra: Vec<(&str, MetaValue)>) -> Metadata {
        let mut m: BTreeMap<String, MetaValue> = BTreeMap::new();
        m.insert("tokenizer.ggml.model".into(), MetaValue::String("gpt2".into()));
        m.insert("tokenizer.ggml.pre".into(), MetaValue::String(pre.into()));
        m.insert("tokenizer.ggml.tokens".into(), strs(&["<s>", "</s>", "a", "b", "ab", "Ġ", "<tool>"]));
        m.insert("tokenizer.ggml.merges".into(), strs(&["a b"]));
        m.insert(
            "tokenizer.ggml.token_type".into(),
            MetaValue::Array {
                elem_type: ValueType::I32,
                items: [3, 3, 1, 1, 1, 1, 4].iter().map(|&t| MetaValue::I32(t)).collect(),
            },
        );
        m.insert("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(0));
        m.insert("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(1));
        for (k, v) in extra {
            m.insert(k.into(), v);
        }
        Metadata::new(Path::new("t.gguf"), m)
    }

    #[test]
    fn smollm_layout() {
        let files = tokenizer_files(
            &meta("smollm", vec![("tokenizer.ggml.add_bos_token", MetaValue::Bool(false))]),
            Some(8192),
        )
        .expect("files");
        let t = &files.tokenizer_json;
        assert_eq!(t["pre_tokenizer"]["pretokenizers"][0], json!({"type": "Digits", "individual_digits": true}));
        assert_eq!(t["pre_tokenizer"]["pretokenizers"][1]["use_regex"], json!(true));
        assert_eq!(t["model"]["ignore_merges"], json!(false));
        assert_eq!(t["model"]["vocab"]["ab"], json!(4));
        assert_eq!(t["model"]["merges"], json!([["a", "b"]]));
        let added = t["added_tokens"].as_array().expect("added");
        assert_eq!(added.len(), 3);
        assert_eq!((added[2]["content"].clone(), added[2]["special"].clone()), (json!("<tool>"), json!(false)));
        assert_eq!(added[0]["special"], json!(true));
        let single = &t["post_processor"]["processors"][1]["single"];
        assert_eq!(single, &json!([{"Sequence": {"id": "A", "type_id": 0}}]), "no BOS when add_bos_token is false");
        let cfg = &files.tokenizer_config_json;
        assert_eq!((cfg["bos_token"].clone(), cfg["eos_token"].clone()), (json!("<s>"), json!("</s>")));
        assert_eq!(cfg["model_max_length"], json!(8192));
        assert_eq!(files.generation_config_json, json!({"bos_token_id": 0, "eos_token_id": 1}));
    }

    #[test]
    fn llama_bpe_adds_bos_by_default_and_lists_stop_ids() {
        let m = meta(
            "llama-bpe",
            vec![
                ("tokenizer.ggml.eot_token_id", MetaValue::U32(6)),
                ("tokenizer.chat_template", MetaValue::String("{{ x }}".into())),
            ],
        );
        let files = tokenizer_files(&m, None).expect("files");
        let t = &files.tokenizer_json;
        assert_eq!(t["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"], json!(LLAMA3_REGEX));
        assert_eq!(t["pre_tokenizer"]["pretokenizers"][1]["use_regex"], json!(false));
        assert_eq!(t["model"]["ignore_merges"], json!(true));
        let tp = &t["post_processor"]["processors"][1];
        assert_eq!(tp["single"][0], json!({"SpecialToken": {"id": "<s>", "type_id": 0}}));
        assert_eq!(tp["pair"].as_array().map(Vec::len), Some(4));
        assert_eq!(tp["special_tokens"]["<s>"]["ids"], json!([0]));
        assert_eq!(files.generation_config_json["eos_token_id"], json!([1, 6]));
        assert_eq!(files.tokenizer_config_json["chat_template"], json!("{{ x }}"));
        assert_eq!(files.tokenizer_config_json["add_bos_token"], json!(true));
    }

    #[test]
    fn unsupported_values_are_named_with_the_supported_list() {
        let err = tokenizer_files(&meta("tekken", vec![]), None).expect_err("tekken").to_string();
        assert!(err.contains("'tekken'") && err.contains("smollm"), "{err}");
        let err =
            tokenizer_files(&meta("gpt2", vec![("tokenizer.ggml.model", MetaValue::String("llama".into()))]), None)
                .expect_err("spm")
                .to_string();
        assert!(err.contains("'llama'") && err.contains("gpt2"), "{err}");
        let err = tokenizer_files(&meta("gpt2", vec![("tokenizer.ggml.merges", strs(&["abc"]))]), None)
            .expect_err("merge")
            .to_string();
        assert!(err.contains("\"abc\""), "{err}");
        let err = tokenizer_files(&meta("gpt2", vec![("tokenizer.ggml.eos_token_id", MetaValue::U32(99))]), None)
            .expect_err("id")
            .to_string();
        assert!(err.contains("99"), "{err}");
        let err = tokenizer_files(&meta("gpt2", vec![("tokenizer.ggml.tokens", strs(&["a", "a"]))]), None)
            .expect_err("dup")
            .to_string();
        assert!(err.contains("ids 0 and 1"), "{err}");
    }
}
