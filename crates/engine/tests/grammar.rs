//! Constrained decoding through [`Decoding`]: rows of seeded random logits (a model that would
//! write anything) are masked by a grammar, so whatever is sampled — greedy or with
//! temperature — the text parses and matches the schema, enums included; the sequence ends
//! as soon as the grammar is complete; stop strings and the length limit still apply; a schema
//! the library cannot compile is an error naming it; and the speculation hook
//! (`allowed_prefix`) cuts a draft at the first token the grammar forbids.

use std::ops::ControlFlow;
use std::path::Path;

use ollm_engine::decoding::{Decoding, Next};
use ollm_engine::{FinishReason, GenerateParams, GrammarCompiler, GrammarSpec, SamplingParams, TokenEvent};
use ollm_tokenizer::Tokenizer;
use serde_json::{Value, json};

const EOS: u32 = 2;

fn tokenizer() -> Tokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden/llama3_tied");
    Tokenizer::from_dir(&dir).expect("fixture tokenizer")
}

fn params(spec: &GrammarSpec, tok: &Tokenizer, temperature: f32, seed: u64) -> GenerateParams {
    let compiler = GrammarCompiler::new(tok, &[EOS], tok.vocab_size()).expect("vocabulary");
    GenerateParams {
        max_new_tokens: 400,
        sampling: SamplingParams { temperature, seed, ..SamplingParams::greedy() },
        eos_token_ids: vec![EOS],
        stop: Vec::new(),
        harmony: None,
        cancel: None,
        grammar: Some(compiler.compile(spec).expect("compiles")),
        speculate: None,
        logprobs: None,
    }
}

/// Runs a sequence on random logits (seeded) and returns its text and why it ended.
fn run(tok: &Tokenizer, params: &GenerateParams, seed: u64) -> (String, FinishReason) {
    let mut dec = Decoding::new(params).expect("decoding");
    let mut rng = ollm_engine::sampling::SeededRng::new(seed ^ 0x9e37);
    let mut streamed = String::new();
    let mut on = |e: TokenEvent<'_>| {
        streamed.push_str(e.text);
        ControlFlow::Continue(())
    };
    let mut history = Vec::new();
    let finish = loop {
        let mut logits: Vec<f32> = (0..tok.vocab_size()).map(|_| rng.next_f64() as f32 * 8.0 - 4.0).collect();
        match dec.advance(tok, &mut logits, &history, false, &mut on).expect("advance") {
            Next::Feed(id) => history.push(id),
            Next::Finished(f) => break f,
        }
    };
    let text = dec.finish(tok, finish, &mut on).expect("finish").text;
    assert_eq!(streamed, text, "the streamed text is the text");
    (text, finish)
}

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "verdict": {"enum": ["ok", "suspicious", "bad"]},
            "score": {"type": "integer", "minimum": 0, "maximum": 9},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3},
            "note": {"type": "string", "maxLength": 8}
        },
        "required": ["verdict", "score", "tags"],
        "additionalProperties": false
    })
}

fn check_against_schema(v: &Value) {
    let o = v.as_object().expect("an object");
    assert!(o.keys().all(|k| ["verdict", "score", "tags", "note"].contains(&k.as_str())), "{v}");
    assert!(["ok", "suspicious", "bad"].contains(&o["verdict"].as_str().expect("verdict string")), "{v}");
    let score = o["score"].as_i64().expect("integer score");
    assert!((0..=9).contains(&score), "{v}");
    let tags = o["tags"].as_array().expect("tags array");
    assert!((1..=3).contains(&tags.len()), "{v}");
    assert!(tags.iter().all(|t| t.as_str().is_some_and(|s| s.chars().count() <= 4)), "{v}");
    if let Some(n) = o.get("note") {
        assert!(n.as_str().is_some_and(|s| s.chars().count() <= 8), "{v}");
    }
}

#[test]
fn random_logits_under_a_schema_give_valid_json_greedy_and_sampled() {
    let tok = tokenizer();
    let spec = GrammarSpec::JsonSchema(schema());
    for (temperature, seed) in [(0.0, 1), (1.0, 2), (1.0, 3), (0.7, 4), (1.5, 5)] {
        let p = params(&spec, &tok, temperature, seed);
        let (text, finish) = run(&tok, &p, seed);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?} does not parse: {e}"));
        check_against_schema(&v);
        assert!(
            matches!(finish, FinishReason::GrammarComplete | FinishReason::Eos),
            "ends with the grammar, not {finish:?}: {text}"
        );
    }
}

#[test]
fn json_object_and_regex_and_lark_constrain_the_text() {
    let tok = tokenizer();
    let (text, _) = run(&tok, &params(&GrammarSpec::JsonObject, &tok, 1.0, 9), 9);
    assert!(serde_json::from_str::<Value>(&text).expect("parses").is_object(), "{text}");

    let (text, finish) = run(&tok, &params(&GrammarSpec::Regex("[a-c]{3}-[0-9]{2}".into()), &tok, 1.0, 7), 7);
    assert_eq!(text.len(), 6, "{text}");
    assert!(text[..3].chars().all(|c| ('a'..='c').contains(&c)) && &text[3..4] == "-", "{text}");
    assert!(text[4..].chars().all(|c| c.is_ascii_digit()), "{text}");
    assert_eq!(finish, FinishReason::GrammarComplete);

    let lark = "start: (\"yes\" | \"no\") \" because \" /[a-z]{2,5}/ \".\"";
    let (text, _) = run(&tok, &params(&GrammarSpec::Lark(lark.into()), &tok, 1.0, 8), 8);
    assert!(text.starts_with("yes because ") || text.starts_with("no because "), "{text}");
    assert!(text.ends_with('.'), "{text}");
}

#[test]
fn stop_strings_and_the_length_limit_still_apply() {
    let tok = tokenizer();
    let spec = GrammarSpec::Regex("[ab]{30}".into());
    let mut p = params(&spec, &tok, 1.0, 3);
    p.max_new_tokens = 5;
    let (text, finish) = run(&tok, &p, 3);
    assert_eq!(finish, FinishReason::Length);
    assert!(text.len() <= 30 && text.chars().all(|c| c == 'a' || c == 'b'), "{text}");

    let mut p = params(&GrammarSpec::Regex("x[ab]{3}y[ab]{20}".into()), &tok, 0.0, 3);
    p.stop = vec!["y".into()];
    let (text, finish) = run(&tok, &p, 3);
    assert_eq!(finish, FinishReason::Stop);
    assert!(text.starts_with('x') && !text.contains('y') && text.len() == 4, "{text}");
}

#[test]
fn a_schema_the_library_cannot_compile_is_an_error_naming_it() {
    let tok = tokenizer();
    let compiler = GrammarCompiler::new(&tok, &[EOS], tok.vocab_size()).expect("vocabulary");
    let bad = GrammarSpec::JsonSchema(json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}));
    let e = compiler.compile(&bad).expect_err("a dangling $ref");
    assert!(e.to_string().contains("JSON schema"), "{e}");
    let e = compiler.compile(&GrammarSpec::Lark("start: (".into())).expect_err("broken lark");
    assert!(e.to_string().contains("Lark grammar"), "{e}");
}

#[test]
fn the_speculation_hook_cuts_a_draft_where_the_grammar_forbids() {
    let tok = tokenizer();
    let p = params(&GrammarSpec::Regex("ab+c".into()), &tok, 0.0, 1);
    let mut dec = Decoding::new(&p).expect("decoding");
    let ids = |s: &str| tok.encode(s, false).expect("encode");
    let abbc = ids("abbc");
    assert!(dec.allows(abbc[0]).expect("mask"));
    assert_eq!(dec.allowed_prefix(&abbc).expect("draft"), abbc.len(), "a valid draft is kept whole");
    let bad = [ids("ab"), ids("x")].concat();
    assert_eq!(dec.allowed_prefix(&bad).expect("draft"), ids("ab").len(), "cut at the forbidden token");
    let x = ids("x")[0];
    assert!(!dec.allows(x).expect("mask"), "x cannot start the text");
    let with_eos = [abbc.clone(), vec![EOS]].concat();
    assert_eq!(dec.allowed_prefix(&with_eos).expect("draft"), with_eos.len(), "eos where the grammar may end");
    let early_eos = [ids("ab"), vec![EOS]].concat();
    assert_eq!(dec.allowed_prefix(&early_eos).expect("draft"), ids("ab").len(), "no eos before the grammar may end");
}
