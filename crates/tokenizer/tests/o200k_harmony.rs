//! The real GPT-OSS tokenizer: o200k_harmony (o200k_base's 199,998 ranks, tiktoken's split
//! pattern, the harmony special tokens at 199998..201087) built into a tokenizer.json from the
//! o200k_base.tiktoken file OpenAI publishes, then run through `tokenizers`, gives tiktoken's
//! ids (scripts/make_o200k_encodings.py, tiktoken 0.14) for prose in several scripts, code,
//! numbers, contractions, whitespace runs and the official chat template's harmony prompts, and
//! decodes back to the text.
//!
//! The 3.6 MB vocabulary is not in the repository: `OLLM_O200K_BASE` names it (.ci/run fetches
//! it from the litellm wheel on PyPI, which carries a copy). Without it the test says SKIPPED;
//! with `OLLM_REQUIRE_O200K=1` a missing file fails.

use std::path::Path;

use ollm_tokenizer::Tokenizer;
use ollm_tokenizer::tiktoken::{O200K_PATTERN, parse_ranks, tokenizer_json};

#[test]
fn o200k_harmony_encodes_like_tiktoken() {
    let Some(base) = std::env::var_os("OLLM_O200K_BASE") else {
        assert!(
            std::env::var_os("OLLM_REQUIRE_O200K").is_none(),
            "OLLM_REQUIRE_O200K is set but OLLM_O200K_BASE is not"
        );
        eprintln!("SKIPPED: set OLLM_O200K_BASE to o200k_base.tiktoken");
        return;
    };
    let text = std::fs::read_to_string(&base).expect("o200k_base.tiktoken");
    let ranks = parse_ranks(&text, &Path::new(&base).display().to_string()).expect("ranks");
    assert_eq!(ranks.len(), 199_998, "o200k_base has 199,998 ranks");
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/harmony/o200k_harmony.json"),
        )
        .expect("fixture"),
    )
    .expect("json");
    let named = fixture["specials"].as_object().expect("specials");
    let specials: Vec<(u32, String)> = (199_998..201_088u32)
        .map(|id| {
            let name = named.get(&id.to_string()).and_then(|v| v.as_str());
            (id, name.map_or_else(|| format!("<|reserved_{id}|>"), str::to_string))
        })
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, tokenizer_json(&ranks, O200K_PATTERN, &specials).to_string()).expect("write");
    let tok = Tokenizer::from_file(&path).expect("tokenizers loads the converted vocabulary");
    assert_eq!(tok.token_to_id("<|channel|>"), Some(200_005));
    let cases = fixture["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 12);
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let want: Vec<u32> =
            case["ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect();
        let got = tok.encode(text, false).expect("encode");
        assert_eq!(got, want, "{text:?}");
        assert_eq!(tok.decode(&got, false).expect("decode"), text, "round trip");
    }
}
