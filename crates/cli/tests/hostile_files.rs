//! Seeded mutation test of every parser of a model directory (issue 21): safetensors headers and
//! the shard index, config.json (all three families), GGUF metadata and tensor tables (open and
//! import), tokenizer.json, chat templates with tokenizer_config.json, and
//! generation_config.json.
//!
//! The seeds are a tiny valid model plus one file per hole the first fuzzing found (a context of
//! 2^62, rope_theta 0, a llama3 factor 0, stray safetensors bytes, a GGUF key of control bytes,
//! a doubling template …), built below. Each case mutates one seed (bit flips, interesting
//! integers over length fields, splices, truncation; JSON leaves replaced by hostile values) and
//! asserts: no panic, at most a bounded allocation (64 MiB, 256 MiB for chat templates, plus 64
//! bytes per byte of input, measured by a counting allocator on the parsing thread), and an
//! error message of one line without control characters.
//!
//! `OLLM_TEST_SEED=<u64>` replays a run (the seed is printed); `OLLM_HOSTILE_SCALE=<f64>` scales
//! the number of cases (1.0: 3,200, about 30 s on 2 cores in the dev profile);
//! `OLLM_HOSTILE_VERBOSE=1` names each case before it runs (to find one that aborts or hangs).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;

use ollm_engine::GenerationConfig;
use ollm_models::synth::{Like, plan_llama, write_plan};
use ollm_ops::cpu::CpuBackend;
use ollm_tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use ollm_weights::Catalog;
use ollm_weights::format::gguf::writer::GgufWriter;
use ollm_weights::format::gguf::{GgmlType, GgufFile, MetaValue, ValueType, import_gguf};
use serde_json::{Value, json};

// ---- allocation accounting ---------------------------------------------------------------

/// The system allocator, counting the bytes live on each thread and their peak.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged and only
// updates thread-local counters (const-initialised, no destructor, so no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds alloc's contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for alloc.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (so from System) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        track(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for dealloc; the caller upholds realloc's contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            track(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f`, returning its result and the peak bytes it had live on this thread above the start.
fn measured<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let out = f();
    let peak = PEAK.with(Cell::get);
    (out, (peak - start).max(0) as usize)
}

// ---- randomness and mutation -------------------------------------------------------------

/// splitmix64: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Integers that break length and count checks.
const INTERESTING: [u64; 14] = [
    0,
    1,
    2,
    0x7F,
    0xFF,
    0xFFFF,
    0x7FFF_FFFF,
    0xFFFF_FFFF,
    1 << 24,
    1 << 32,
    1 << 40,
    1 << 62,
    i64::MAX as u64,
    u64::MAX,
];

/// One to four byte-level mutations of `seed`; most land in `focus` (a header), where lengths
/// and counts live.
fn mutate_bytes(rng: &mut Rng, seed: &[u8], focus: usize) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let span = if rng.below(4) == 0 || focus == 0 { b.len() } else { focus.min(b.len()) };
        let at = rng.below(span.max(1));
        let last = b.len().saturating_sub(1);
        match rng.below(9) {
            0 if !b.is_empty() => b[at.min(last)] ^= 1 << rng.below(8),
            1 if !b.is_empty() => b[at.min(last)] = *rng.pick(&[0u8, 0x7F, 0x80, 0xFF, b'\n', 0x1B]),
            2 | 3 => {
                let v = rng.pick(&INTERESTING).to_le_bytes();
                let width = *rng.pick(&[4usize, 8]);
                let at = at & !(width - 1);
                if at + width <= b.len() {
                    b[at..at + width].copy_from_slice(&v[..width]);
                }
            }
            4 => {
                let n = 1 + rng.below(64);
                let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                let at = at.min(b.len());
                b.splice(at..at, junk);
            }
            5 if !b.is_empty() => {
                let at = at.min(b.len() - 1);
                let end = (at + 1 + rng.below(64)).min(b.len());
                b.drain(at..end);
            }
            6 if !b.is_empty() => {
                let at = at.min(b.len() - 1);
                let end = (at + 1 + rng.below(256)).min(b.len());
                let copy = b[at..end].to_vec();
                b.splice(at..at, copy);
            }
            7 => b.truncate(rng.below(b.len() + 1)),
            _ => b.extend((0..1 + rng.below(128)).map(|_| rng.next() as u8)),
        }
    }
    b
}

/// JSON values that once broke a config: zeros, negatives, huge numbers, wrong types.
fn hostile_value(rng: &mut Rng) -> Value {
    match rng.below(18) {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(1u64 << 62),
        3 => json!(1_000_000_000u64),
        4 => json!(u64::MAX),
        5 => json!(1e308),
        6 => json!(-1e308),
        7 => json!(1e-300),
        8 => json!(0.5),
        9 => json!("x\n\u{1b}[2J"),
        10 => Value::Null,
        11 => json!(true),
        12 => json!([]),
        13 => json!({}),
        14 => json!([1, 2]),
        15 => json!(1 << 20),
        16 => json!("a".repeat(10_000)),
        _ => json!(-0.0),
    }
}

/// Replaces, removes or duplicates one randomly chosen node of `v`.
fn mutate_json(rng: &mut Rng, v: &mut Value) {
    fn count(v: &Value) -> usize {
        1 + match v {
            Value::Object(m) => m.values().map(count).sum(),
            Value::Array(a) => a.iter().map(count).sum(),
            _ => 0,
        }
    }
    fn visit(v: &mut Value, target: &mut usize, rng: &mut Rng) -> bool {
        if *target == 0 {
            *v = hostile_value(rng);
            return true;
        }
        *target -= 1;
        match v {
            Value::Object(m) => {
                if rng.below(16) == 0 && !m.is_empty() {
                    let key = m.keys().nth(rng.below(m.len())).cloned().unwrap_or_default();
                    m.remove(&key);
                    return true;
                }
                m.values_mut().any(|x| visit(x, target, rng))
            }
            Value::Array(a) => a.iter_mut().any(|x| visit(x, target, rng)),
            _ => false,
        }
    }
    let n = count(v);
    let mut target = rng.below(n);
    visit(v, &mut target, rng);
}

/// A mutated JSON text: mostly structure-aware, sometimes byte-level.
fn mutated_json(rng: &mut Rng, seed: &Value) -> Vec<u8> {
    if rng.below(5) == 0 {
        let text = serde_json::to_vec(seed).expect("serialise");
        return mutate_bytes(rng, &text, 0);
    }
    let mut v = seed.clone();
    for _ in 0..1 + rng.below(3) {
        mutate_json(rng, &mut v);
    }
    serde_json::to_vec(&v).expect("serialise")
}

// ---- the checks --------------------------------------------------------------------------

/// What one case ended with, for the per-target tallies.
#[derive(Default, Debug)]
struct Tally {
    cases: usize,
    accepted: usize,
    rejected: usize,
    peak_bytes: usize,
}

/// Bytes a case may have live beyond 64 per byte of input: 64 MiB, except for chat templates,
/// whose rendered prompt alone may reach 64 MiB (and its buffer grows by doubling).
fn base_bound(target: &str) -> usize {
    if target == "chat template" { 256 << 20 } else { 64 << 20 }
}

/// Runs one case: no panic, allocation within the bound, one-line errors.
fn check(target: &str, case: usize, input_bytes: usize, tally: &mut Tally, f: impl FnOnce() -> Result<(), String>) {
    let bound = base_bound(target) + 64 * input_bytes;
    if std::env::var_os("OLLM_HOSTILE_VERBOSE").is_some() {
        eprintln!("hostile_files: {target} case {case}");
    }
    let (out, peak) = measured(|| catch_unwind(AssertUnwindSafe(f)));
    tally.cases += 1;
    tally.peak_bytes = tally.peak_bytes.max(peak);
    match out {
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{target} case {case}: panicked: {what}");
        }
        Ok(Ok(())) => tally.accepted += 1,
        Ok(Err(msg)) => {
            tally.rejected += 1;
            assert!(
                !msg.chars().any(char::is_control),
                "{target} case {case}: the error is not one clean line: {msg:?}"
            );
            assert!(!msg.is_empty(), "{target} case {case}: empty error");
        }
    }
    assert!(peak <= bound, "{target} case {case}: {peak} bytes live at peak, over the bound of {bound}");
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("write case file");
}

// ---- seeds -------------------------------------------------------------------------------

/// A one-layer llama of hidden 64 and a 512-token vocabulary (weights, config, tokenizer).
fn tiny_llama(dir: &Path) {
    let mut config = Like::Llama32_1B.config();
    for (k, v) in [
        ("hidden_size", 64),
        ("intermediate_size", 96),
        ("num_attention_heads", 4),
        ("num_key_value_heads", 2),
        ("head_dim", 16),
        ("vocab_size", 512),
    ] {
        config[k] = v.into();
    }
    write_plan(&plan_llama(config, Some(1)).expect("plan"), dir, 7, &mut |_, _| {}).expect("write tiny llama");
}

/// config.json seeds: the tiny llama's, the other families', and every hole of issue 21.
fn config_seeds(base: &Value) -> Vec<Value> {
    let mut seeds = vec![base.clone(), Like::GptOss20B.config(), Like::Qwen3Next80B.config()];
    let with = |k: &str, v: Value| {
        let mut c = base.clone();
        c[k] = v;
        c
    };
    // The largest context accepted: loading it must not build its 2^24-position RoPE tables.
    seeds.push(with("max_position_embeddings", json!(1u64 << 24)));
    seeds.push(with("max_position_embeddings", json!(1u64 << 62)));
    seeds.push(with("max_position_embeddings", json!(1_000_000_000u64)));
    seeds.push(with("rope_theta", json!(0)));
    seeds.push(with("rope_theta", json!(-1)));
    seeds.push(with("rms_norm_eps", json!(-1)));
    let mut factor0 = base.clone();
    factor0["rope_scaling"]["factor"] = json!(0);
    seeds.push(factor0);
    seeds
}

/// A tiny llama GGUF (F32 weights, a 16-token gpt2 vocabulary) with `extra` metadata on top.
fn tiny_gguf(extra: &[(&str, MetaValue)]) -> Vec<u8> {
    const H: u64 = 32;
    const I: u64 = 48;
    const V: u64 = 16;
    let strs = |items: &[&str]| MetaValue::Array {
        elem_type: ValueType::String,
        items: items.iter().map(|s| MetaValue::String(s.to_string())).collect(),
    };
    let tokens = ["<s>", "</s>", "a", "b", "c", "d", "e", "f", "g", "h", "Ġ", "ab", "Ġa", "1", "2", "<user>"];
    let types = MetaValue::Array {
        elem_type: ValueType::I32,
        items: (0..V).map(|i| MetaValue::I32(if i < 2 { 3 } else { 1 })).collect(),
    };
    // The tiny llama's metadata; an `extra` key replaces its default (a key may appear once).
    let defaults = [
        ("general.architecture", MetaValue::String("llama".into())),
        ("llama.context_length", MetaValue::U32(256)),
        ("llama.embedding_length", MetaValue::U32(H as u32)),
        ("llama.feed_forward_length", MetaValue::U32(I as u32)),
        ("llama.block_count", MetaValue::U32(1)),
        ("llama.attention.head_count", MetaValue::U32(2)),
        ("llama.attention.head_count_kv", MetaValue::U32(2)),
        ("llama.rope.freq_base", MetaValue::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(1e-5)),
        ("tokenizer.ggml.model", MetaValue::String("gpt2".into())),
        ("tokenizer.ggml.pre", MetaValue::String("smollm".into())),
        ("tokenizer.ggml.tokens", strs(&tokens)),
        ("tokenizer.ggml.token_type", types),
        ("tokenizer.ggml.merges", strs(&["a b", "Ġ a"])),
        ("tokenizer.ggml.bos_token_id", MetaValue::U32(0)),
        ("tokenizer.ggml.eos_token_id", MetaValue::U32(1)),
        ("tokenizer.chat_template", MetaValue::String("{{ messages }}".into())),
    ];
    let mut w = GgufWriter::new();
    for (k, v) in defaults {
        if !extra.iter().any(|(e, _)| *e == k) {
            w.kv(k, v);
        }
    }
    for (k, v) in extra {
        w.kv(k, v.clone());
    }
    let f32s = |n: u64| -> Vec<u8> { (0..n).flat_map(|i| ((i % 13) as f32 / 13.0).to_le_bytes()).collect() };
    w.tensor("token_embd.weight", &[H, V], GgmlType::F32, f32s(H * V))
        .tensor("blk.0.attn_norm.weight", &[H], GgmlType::F32, f32s(H))
        .tensor("blk.0.attn_q.weight", &[H, H], GgmlType::F32, f32s(H * H))
        .tensor("blk.0.attn_k.weight", &[H, H], GgmlType::F32, f32s(H * H))
        .tensor("blk.0.attn_v.weight", &[H, H], GgmlType::F32, f32s(H * H))
        .tensor("blk.0.attn_output.weight", &[H, H], GgmlType::F32, f32s(H * H))
        .tensor("blk.0.ffn_norm.weight", &[H], GgmlType::F32, f32s(H))
        .tensor("blk.0.ffn_gate.weight", &[H, I], GgmlType::F32, f32s(H * I))
        .tensor("blk.0.ffn_up.weight", &[H, I], GgmlType::F32, f32s(H * I))
        .tensor("blk.0.ffn_down.weight", &[I, H], GgmlType::F32, f32s(H * I))
        .tensor("output_norm.weight", &[H], GgmlType::F32, f32s(H));
    w.to_bytes()
}

/// GGUF seeds: the tiny llama, and the holes (a context of 2^62, freq_base 0, a control-byte
/// key, arrays claiming more items than the file holds).
fn gguf_seeds() -> Vec<Vec<u8>> {
    let junk = |n: usize| MetaValue::Array { elem_type: ValueType::U8, items: vec![MetaValue::U8(7); n] };
    vec![
        tiny_gguf(&[]),
        tiny_gguf(&[("llama.context_length", MetaValue::U64(1 << 62))]),
        tiny_gguf(&[("llama.rope.freq_base", MetaValue::F32(0.0))]),
        tiny_gguf(&[("general.na\nme\u{1b}[2J", MetaValue::U8(1))]),
        tiny_gguf(&[("junk.0", junk(4096)), ("junk.1", junk(4096))]),
    ]
}

/// Chat templates: real ones, and ones that loop, double or flood.
fn template_seeds(dir: &Path) -> Vec<String> {
    let mut seeds = vec![
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/harmony/chat_template.jinja"))
            .expect("harmony template"),
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content | trim }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}".into(),
        "{% macro d(n) %}{% if n == 0 %}ab{% else %}{{ d(n - 1) }}{{ d(n - 1) }}{% endif %}{% endmacro %}{{ d(60) }}".into(),
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}".into(),
        "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}".into(),
    ];
    if let Ok(cfg) = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        && let Ok(v) = serde_json::from_str::<Value>(&cfg)
        && let Some(t) = v.get("chat_template").and_then(Value::as_str)
    {
        seeds.push(t.to_string());
    }
    seeds
}

/// Snippets spliced into templates. None builds a large string in few instructions: minijinja
/// has no memory limit, so `{{ 'ab' * 50000000 }}` inside the doubling macro still takes
/// gigabytes before the fuel runs out (a known hole, see the crate's chat_template.rs).
const SNIPPETS: [&str; 8] = [
    "{% for i in range(1000000) %}{{ i }}{% endfor %}",
    "{% macro r(n) %}{{ r(n + 1) }}{% endmacro %}{{ r(0) }}",
    "{{ 'ab' * 10 }}",
    "{% set ns = namespace(s='x') %}{% for i in range(20) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
    "{{ raise_exception('bad\nline') }}",
    "{{ messages[1000000] }}",
    "{% if %}",
    "{{ strftime_now('%d %b %Y') }}",
];

fn mutate_template(rng: &mut Rng, seed: &str) -> String {
    match rng.below(3) {
        0 => {
            let mut at = rng.below(seed.len() + 1);
            while !seed.is_char_boundary(at) {
                at -= 1;
            }
            format!("{}{}{}", &seed[..at], rng.pick(&SNIPPETS), &seed[at..])
        }
        _ => String::from_utf8_lossy(&mutate_bytes(rng, seed.as_bytes(), 0)).into_owned(),
    }
}

// ---- the test ----------------------------------------------------------------------------

fn scaled(n: usize) -> usize {
    let scale: f64 = std::env::var("OLLM_HOSTILE_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    ((n as f64 * scale).round() as usize).max(1)
}

/// A GGUF claiming 4 billion layers over one layer's tensors: the import names the first
/// missing tensor without first listing every layer's names (a 2026-12-05 find of the fuzz
/// above: 17 GB of names before the first check).
#[test]
fn a_gguf_claiming_billions_of_layers_fails_on_its_first_missing_tensor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, tiny_gguf(&[("llama.block_count", MetaValue::U32(u32::MAX))])).expect("write");
    let (out, peak) = measured(|| import_gguf(&path, &dir.path().join("out"), &mut |_, _| {}));
    let msg = out.expect_err("4 billion layers over one layer's tensors").to_string();
    assert!(msg.contains("model.layers.1.input_layernorm.weight"), "{msg}");
    assert!(peak < 16 << 20, "{peak} bytes live at peak for a 4 KB file");
}

#[test]
fn hostile_model_files_never_panic_overallocate_or_print_several_lines() {
    let seed: u64 = match std::env::var("OLLM_TEST_SEED") {
        Ok(s) => s.parse().expect("OLLM_TEST_SEED must be a u64"),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
    };
    eprintln!("hostile_files: OLLM_TEST_SEED={seed}");
    let mut rng = Rng(seed);
    let root = tempfile::tempdir().expect("tempdir");
    let model = root.path().join("model");
    tiny_llama(&model);
    let weights = std::fs::read(model.join("model.safetensors")).expect("weights");
    let base_config: Value =
        serde_json::from_slice(&std::fs::read(model.join("config.json")).expect("config")).expect("config json");
    let case_dir = root.path().join("case");
    let fresh = |files: &[(&str, &[u8])]| {
        let _ = std::fs::remove_dir_all(&case_dir);
        std::fs::create_dir_all(&case_dir).expect("case dir");
        for (name, bytes) in files {
            write(&case_dir.join(name), bytes);
        }
    };
    let load = |dir: &Path| -> Result<(), String> {
        let m = ollm_models::load_model(dir, Arc::new(CpuBackend::new())).map_err(|e| e.to_string())?;
        assert!(m.info().max_positions <= 1 << 24, "a context of {} was accepted", m.info().max_positions);
        Ok(())
    };
    let mut report = Vec::new();
    let config_text = serde_json::to_vec(&base_config).expect("config");

    // safetensors headers (and the catalog and model load behind them). Seeds: the tiny model,
    // and the same with 64 stray bytes after its data.
    let header_len = 8 + u64::from_le_bytes(weights[..8].try_into().expect("8 bytes")) as usize;
    let stray = [weights.clone(), vec![0u8; 64]].concat();
    let mut tally = Tally::default();
    for case in 0..scaled(600) {
        let seed_file = if rng.below(4) == 0 { &stray } else { &weights };
        let bytes = mutate_bytes(&mut rng, seed_file, header_len);
        fresh(&[("config.json", &config_text), ("model.safetensors", &bytes)]);
        check("safetensors", case, bytes.len(), &mut tally, || {
            let catalog = Catalog::open_dir(&case_dir).map_err(|e| e.to_string())?;
            let len = bytes.len() as u64;
            let data_start = 8 + u64::from_le_bytes(bytes[..8].try_into().expect("opened: 8 bytes"));
            assert!(catalog.entries().all(|e| e.offset_bytes + e.len_bytes <= len), "a tensor past the file");
            assert_eq!(catalog.total_bytes(), len - data_start, "bytes outside every tensor");
            load(&case_dir)
        });
    }
    report.push(("safetensors header", tally));

    // The shard index over one shard.
    let catalog = Catalog::open_dir(&model).expect("catalog");
    let shard = "model-00001-of-00001.safetensors";
    let index = json!({
        "metadata": {"total_size": catalog.total_bytes()},
        "weight_map": catalog.entries().map(|e| (e.name.clone(), json!(shard))).collect::<serde_json::Map<_, _>>(),
    });
    let mut tally = Tally::default();
    for case in 0..scaled(300) {
        let text = mutated_json(&mut rng, &index);
        fresh(&[(shard, &weights), ("model.safetensors.index.json", &text)]);
        check("index", case, text.len() + weights.len(), &mut tally, || {
            Catalog::open_index(&case_dir.join("model.safetensors.index.json")).map(|_| ()).map_err(|e| e.to_string())
        });
    }
    report.push(("safetensors index", tally));

    // config.json of every family, over the tiny llama's weights.
    let seeds = config_seeds(&base_config);
    let mut tally = Tally::default();
    for case in 0..scaled(900) {
        let seed_config = rng.pick(&seeds).clone();
        let text = if rng.below(4) == 0 {
            serde_json::to_vec(&seed_config).expect("json")
        } else {
            mutated_json(&mut rng, &seed_config)
        };
        fresh(&[("config.json", &text), ("model.safetensors", &weights)]);
        check("config.json", case, text.len() + weights.len(), &mut tally, || {
            // What `ollm plan` reads first, then the model itself.
            ollm_models::registry::model_bytes(&case_dir).map_err(|e| e.to_string())?;
            load(&case_dir)
        });
    }
    report.push(("config.json", tally));

    // GGUF metadata and tensor tables: open, then import what opens.
    let seeds = gguf_seeds();
    let mut tally = Tally::default();
    for case in 0..scaled(600) {
        let seed_file = rng.pick(&seeds);
        let bytes = if rng.below(8) == 0 { seed_file.clone() } else { mutate_bytes(&mut rng, seed_file, 2048) };
        fresh(&[("m.gguf", &bytes)]);
        let out = case_dir.join("imported");
        check("gguf", case, bytes.len(), &mut tally, || {
            GgufFile::open(&case_dir.join("m.gguf")).map_err(|e| e.to_string())?;
            import_gguf(&case_dir.join("m.gguf"), &out, &mut |_, _| {}).map_err(|e| e.to_string())?;
            load(&out)
        });
    }
    report.push(("gguf", tally));

    // tokenizer.json.
    let tokenizer: Value =
        serde_json::from_slice(&std::fs::read(model.join("tokenizer.json")).expect("tokenizer")).expect("json");
    let mut tally = Tally::default();
    for case in 0..scaled(200) {
        let text = mutated_json(&mut rng, &tokenizer);
        fresh(&[("tokenizer.json", &text)]);
        check("tokenizer.json", case, text.len(), &mut tally, || {
            let t = Tokenizer::from_dir(&case_dir).map_err(|e| e.to_string())?;
            let ids = t.encode("hello world 123", true).map_err(|e| e.to_string())?;
            t.decode(&ids, false).map(|_| ()).map_err(|e| e.to_string())
        });
    }
    report.push(("tokenizer.json", tally));

    // Chat templates, from chat_template.jinja and from tokenizer_config.json.
    let seeds = template_seeds(&model);
    let tokenizer_config: Value =
        serde_json::from_slice(&std::fs::read(model.join("tokenizer_config.json")).expect("tokenizer_config"))
            .expect("json");
    let messages = [ChatMessage::new("user", "hi"), ChatMessage::new("assistant", "hello")];
    let mut tally = Tally::default();
    for case in 0..scaled(400) {
        let files: Vec<(&str, Vec<u8>)> = if rng.below(3) == 0 {
            vec![("tokenizer_config.json", mutated_json(&mut rng, &tokenizer_config))]
        } else {
            let seed_template = rng.pick(&seeds).clone();
            let source = mutate_template(&mut rng, &seed_template);
            vec![("chat_template.jinja", source.into_bytes())]
        };
        let size = files.iter().map(|(_, b)| b.len()).sum();
        fresh(&files.iter().map(|(n, b)| (*n, b.as_slice())).collect::<Vec<_>>());
        check("chat template", case, size, &mut tally, || {
            let t = ChatTemplate::from_dir(&case_dir).map_err(|e| e.to_string())?;
            match t {
                Some(t) => t.render(&messages, true).map(|_| ()).map_err(|e| e.to_string()),
                None => Ok(()),
            }
        });
    }
    report.push(("chat template", tally));

    // generation_config.json.
    let generation: Value =
        serde_json::from_slice(&std::fs::read(model.join("generation_config.json")).expect("generation"))
            .expect("json");
    let generation = if generation.get("temperature").is_some() {
        generation
    } else {
        json!({"do_sample": true, "temperature": 0.6, "top_p": 0.9, "top_k": 40, "eos_token_id": [1, 2]})
    };
    let mut tally = Tally::default();
    for case in 0..scaled(200) {
        let text = mutated_json(&mut rng, &generation);
        fresh(&[("generation_config.json", &text)]);
        check("generation_config.json", case, text.len(), &mut tally, || {
            GenerationConfig::from_dir(&case_dir).map(|_| ()).map_err(|e| e.to_string())
        });
    }
    report.push(("generation_config.json", tally));

    let total: usize = report.iter().map(|(_, t)| t.cases).sum();
    for (target, t) in &report {
        eprintln!(
            "hostile_files: {target}: {} cases, {} accepted, {} rejected, peak {} KiB",
            t.cases,
            t.accepted,
            t.rejected,
            t.peak_bytes >> 10
        );
        assert!(t.rejected > 0, "{target}: no mutation was rejected; the mutator does nothing");
    }
    eprintln!("hostile_files: {total} cases in all (OLLM_TEST_SEED={seed})");
}
