//! tiktoken vocabularies (`*.tiktoken`: one `base64(token bytes) rank` per line, as OpenAI
//! publishes o200k_base) turned into a Hugging Face tokenizer.json that the `tokenizers` crate
//! runs: byte-level BPE whose vocabulary is the ranks and whose merges are, for each token in
//! rank order, the ways to split it into two lower-ranked tokens (ordered by their ranks), so
//! merging the lowest-ranked pair first is tiktoken's rule. A piece that is one token already
//! is taken whole (`ignore_merges`), as tiktoken does.

use std::collections::HashMap;

use base64::Engine;
use serde_json::{Value, json};

use crate::{Result, TokenizerError};

/// tiktoken's o200k pre-tokenizer split (o200k_base, and o200k_harmony for GPT-OSS).
pub const O200K_PATTERN: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
);

/// GPT-2's byte-to-character map (the ByteLevel alphabet): printable bytes stand for
/// themselves, the others for U+0100 onwards, in byte order.
pub fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0u32..256 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            b
        } else {
            extra += 1;
            255 + extra
        };
        out[b as usize] = char::from_u32(c).unwrap_or('\u{FFFD}');
    }
    out
}

/// Parses a `.tiktoken` file's text into (token bytes, rank) in file order.
pub fn parse_ranks(text: &str, source: &str) -> Result<Vec<(Vec<u8>, u32)>> {
    let bad = |line: usize, detail: &str| TokenizerError::Load {
        path: source.into(),
        detail: format!("line {line}: {detail} (expected 'base64 rank')"),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let (b64, rank) = line.split_once(' ').ok_or_else(|| bad(i + 1, "no space"))?;
            let bytes = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| bad(i + 1, "bad base64"))?;
            let rank = rank.trim().parse::<u32>().map_err(|_| bad(i + 1, "bad rank"))?;
            Ok((bytes, rank))
        })
        .collect()
}

/// A tokenizer.json for `ranks` (from [`parse_ranks`]), the pre-tokenizer split `pattern` and
/// the special tokens `specials` (id, text).
pub fn tokenizer_json(ranks: &[(Vec<u8>, u32)], pattern: &str, specials: &[(u32, String)]) -> Value {
    let chars = byte_chars();
    let text = |b: &[u8]| b.iter().map(|&x| chars[x as usize]).collect::<String>();
    let rank_of: HashMap<&[u8], u32> = ranks.iter().map(|(b, r)| (b.as_slice(), *r)).collect();
    let mut by_rank: Vec<&(Vec<u8>, u32)> = ranks.iter().collect();
    by_rank.sort_by_key(|(_, r)| *r);
    let mut merges = Vec::new();
    for (token, _) in by_rank {
        let mut splits: Vec<(u32, u32, usize)> = (1..token.len())
            .filter_map(|i| Some((*rank_of.get(&token[..i])?, *rank_of.get(&token[i..])?, i)))
            .collect();
        splits.sort_unstable();
        merges.extend(splits.into_iter().map(|(_, _, i)| json!([text(&token[..i]), text(&token[i..])])));
    }
    let vocab: serde_json::Map<String, Value> = ranks
        .iter()
        .map(|(b, r)| (text(b), json!(r)))
        .chain(specials.iter().map(|(id, s)| (s.clone(), json!(id))))
        .collect();
    let added: Vec<Value> = specials
        .iter()
        .map(|(id, s)| {
            json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": true,
                  "vocab": vocab, "merges": merges},
    })
}
