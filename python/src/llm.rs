//! `ollm_rs.LLM`: a loaded model with its tokenizer, and the calls that generate from it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use ollm_cli::commands::{ModelArgs, parse_device};
use ollm_cli::loaded::{Chosen, Loaded, load_embedded, load_text};
use ollm_cli::planning::{Budgets, describe, make_plan};
use ollm_cli::speculation::SpecArgs;
use ollm_engine::{ChatModel, DraftTokens, GrammarCompiler, HarmonyMarkers, Session, SpeculateParams};
use ollm_ops::MemoryKind;
use ollm_residency::plan::{Plan, Tier};
use ollm_tokenizer::ChatMessage;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use crate::batch::generate_many;
use crate::errors::{engine, to_py, value_error};
use crate::interrupt::detached;
use crate::output::RequestOutput;
use crate::params::{Options, draft_name};
use crate::stream::TextStream;
use crate::tokenizer::{PyTokenizer, messages};

/// Sessions kept for reuse between calls (one per thread that generated at the same time, up
/// to this many); each holds a sequence's KV cache.
const IDLE_SESSIONS: usize = 4;

/// Owns the loaded model (and its temporary KV spill directory), its tokenizer and template,
/// and the idle sessions; shared by the `LLM` object, its tokenizer and running streams.
pub struct Shared {
    pub loaded: Loaded,
    pub chat: ChatModel,
    pub budgets: Budgets,
    idle: Mutex<Vec<Session>>,
    /// The vocabulary made into llguidance's trie, built on the first `json_schema=`,
    /// `grammar=` or `response_format=` (Err: why this tokenizer cannot have one).
    grammars: OnceLock<Result<GrammarCompiler, String>>,
    /// The last draft model `speculate="draft:MODEL"` loaded, by the name given, kept for the
    /// next call that names it.
    draft: Mutex<Option<(String, SpeculateParams)>>,
}

impl Shared {
    /// An idle session, or a new one.
    pub fn take_session(&self) -> anyhow::Result<Session> {
        if let Some(s) = self.idle.lock().ok().and_then(|mut idle| idle.pop()) {
            return Ok(s);
        }
        Ok(self.chat.session()?)
    }

    /// Keeps a session for the next call (its KV cache memory is reused).
    pub fn return_session(&self, session: Session) {
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < IDLE_SESSIONS
        {
            idle.push(session);
        }
    }

    /// Ids of a plain prompt; empty and too long prompts are `ValueError`s before any work.
    pub fn encode_prompt(&self, text: &str, what: &str) -> PyResult<Vec<u32>> {
        let ids = self.chat.tokenizer.encode_prompt(text).map_err(engine)?;
        self.check_length(ids, what)
    }

    /// Ids of a conversation through the model's chat template.
    pub fn encode_chat(&self, msgs: &[ChatMessage]) -> PyResult<Vec<u32>> {
        let Some(template) = &self.chat.template else {
            return Err(value_error(format!(
                "{} has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja); use generate() with a plain prompt",
                self.loaded.dir.display()
            )));
        };
        let ids = self.chat.tokenizer.encode_chat(template, msgs).map_err(engine)?;
        self.check_length(ids, "the conversation")
    }

    fn check_length(&self, ids: Vec<u32>, what: &str) -> PyResult<Vec<u32>> {
        let context = self.chat.model.info().max_positions;
        if ids.is_empty() {
            return Err(value_error(format!("{what} is empty: give some text")));
        }
        if ids.len() > context {
            return Err(engine(ollm_engine::EngineError::PromptTooLong { prompt: ids.len(), context }));
        }
        Ok(ids)
    }

    /// The harmony markers, for a chat prompt of a harmony model (GPT-OSS).
    pub fn harmony(&self) -> Option<HarmonyMarkers> {
        HarmonyMarkers::from_tokenizer(&self.chat.tokenizer)
    }

    /// The grammar compiler of this model's tokenizer, built on first use.
    pub fn grammar_compiler(&self) -> PyResult<&GrammarCompiler> {
        let built = self.grammars.get_or_init(|| {
            let vocab = self.chat.model.info().vocab_size;
            GrammarCompiler::new(&self.chat.tokenizer, &self.chat.eos_token_ids, vocab).map_err(|e| e.to_string())
        });
        built.as_ref().map_err(|e| value_error(format!("structured output cannot be used with this model: {e}")))
    }

    /// The engine's speculation settings for `spec` (the CLI's `SpecArgs::params`): a draft
    /// model is loaded on the model's backend the first time it is named and kept while the
    /// following calls name it.
    pub fn speculation(&self, spec: &SpecArgs) -> PyResult<Option<SpeculateParams>> {
        let Some(name) = draft_name(spec) else {
            return spec.params(&self.loaded, &self.chat.tokenizer).map_err(|e| to_py(&e));
        };
        let draft_tokens = spec.draft_tokens.unwrap_or(DraftTokens::Auto);
        let mut kept = self.draft.lock().map_err(|_| value_error("the draft model cache is poisoned"))?;
        if let Some((n, p)) = kept.as_ref()
            && n == name
        {
            return Ok(Some(SpeculateParams::new(p.method.clone(), draft_tokens)));
        }
        let params = spec.params(&self.loaded, &self.chat.tokenizer).map_err(|e| to_py(&e))?;
        *kept = params.clone().map(|p| (name.to_string(), p));
        Ok(params)
    }
}

/// A size in bytes: an int, or a string as the CLI takes it ("8GiB", "512MiB", "7.5G").
fn size(v: Option<&Bound<'_, PyAny>>, name: &str, zero_ok: bool) -> PyResult<Option<u64>> {
    let Some(v) = v.filter(|v| !v.is_none()) else { return Ok(None) };
    if let Ok(s) = v.extract::<String>() {
        let parsed = if zero_ok { ollm_cli::units::parse_size_or_zero(&s) } else { ollm_cli::units::parse_size(&s) };
        return parsed.map(Some).map_err(|e| value_error(format!("{name}: {e}")));
    }
    match v.extract::<i128>() {
        Ok(n) if n > 0 || (zero_ok && n == 0) => Ok(Some(u64::try_from(n).unwrap_or(u64::MAX))),
        Ok(n) => Err(value_error(format!(
            "{name} = {n}: give a size {} bytes, or a string such as \"8GiB\"",
            if zero_ok { "of at least 0" } else { "above 0" }
        ))),
        Err(_) => Err(PyTypeError::new_err(format!("{name}: expected an int (bytes) or a string such as \"8GiB\""))),
    }
}

/// A language model loaded for generation.
///
/// `model` is what the CLI's `--model` takes: a Hugging Face model directory, a hub id
/// ORG/NAME (downloaded on first use), or "smollm2-135m" for the demo model (provisioned into
/// `$OLLM_HOME`, else `~/.cache/ollm`). Sizes are ints (bytes) or strings such as "8GiB".
#[pyclass(module = "ollm_rs", name = "LLM", frozen)]
pub struct Llm {
    shared: Arc<Shared>,
}

#[pymethods]
impl Llm {
    #[new]
    #[pyo3(signature = (
        model, device = "auto", vram_budget = None, ram_budget = None, kv_offload = None,
        kv_cache_dir = None, prefix_cache = None, max_context = None, offload_layers_to_cpu = None,
        expert_slots = None, prefix_cache_max = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model: PathBuf,
        device: &str,
        vram_budget: Option<&Bound<'_, PyAny>>,
        ram_budget: Option<&Bound<'_, PyAny>>,
        kv_offload: Option<bool>,
        kv_cache_dir: Option<PathBuf>,
        prefix_cache: Option<PathBuf>,
        max_context: Option<i64>,
        offload_layers_to_cpu: Option<i64>,
        expert_slots: Option<i64>,
        prefix_cache_max: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let count = |v: Option<i64>, name: &str, min: i64| -> PyResult<Option<usize>> {
            match v {
                None => Ok(None),
                Some(n) if n >= min => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
                Some(n) => Err(value_error(format!("{name} = {n}: give a number of at least {min}"))),
            }
        };
        let args = ModelArgs {
            model: model.to_string_lossy().into_owned(),
            device: parse_device(device).map_err(|e| value_error(format!("device {e}")))?,
            vram_budget: size(vram_budget, "vram_budget", false)?,
            ram_budget: size(ram_budget, "ram_budget", true)?,
            offload_layers_to_cpu: count(offload_layers_to_cpu, "offload_layers_to_cpu", 0)?,
            expert_slots: count(expert_slots, "expert_slots", 1)?.map(|n| n as u64),
            max_context: count(max_context, "max_context", 1)?,
            kv_offload: kv_offload.unwrap_or(false),
            kv_cache_dir,
            prefix_cache,
            prefix_cache_max: size(prefix_cache_max, "prefix_cache_max", false)?.unwrap_or(32 << 30),
            cpu_activations: None,
            cpu_kv: None,
            expert_prefetch: false,
        };
        let budgets = args.budgets();
        let shared = detached(py, |_| {
            let load = || -> anyhow::Result<Shared> {
                let loaded = load_embedded(&args)?;
                let text = load_text(&loaded.dir)?;
                let chat = loaded.chat_model(text);
                Ok(Shared {
                    loaded,
                    chat,
                    budgets,
                    idle: Mutex::new(Vec::new()),
                    grammars: OnceLock::new(),
                    draft: Mutex::new(None),
                })
            };
            load().map_err(|e| to_py(&e))
        })?;
        Ok(Self { shared: Arc::new(shared) })
    }

    /// Generates for each prompt (a string, or a list of strings) and returns a list of
    /// outputs in the same order. Keyword arguments (the same for stream() and chat()):
    ///
    /// - temperature, top_p, top_k, min_p, repetition_penalty: unset ones take the model's
    ///   defaults (generation_config.json; greedy when it does not ask for sampling);
    ///   temperature=0 is greedy.
    /// - seed: makes sampling repeatable (default: a random one).
    /// - stop: a string or a list; generation ends where one appears (not included).
    /// - ignore_eos: generate max_new_tokens whatever the model says.
    /// - speculate: "ngram" (continue text seen earlier in the prompt or the answer) or
    ///   "draft:MODEL" (a small model with the same tokenizer, loaded on first use and kept);
    ///   greedy text stays the same, sampled text keeps its distribution. draft_tokens: an int
    ///   or "auto" (default). stats.tokens_per_pass reports the gain.
    /// - json_schema (a dict or a JSON string), grammar (llguidance's Lark syntax) or
    ///   response_format (OpenAI's {"type": "json_object" | "json_schema", ...}): the output
    ///   is constrained to it; one of the three at most. With one of them decoding is plain
    ///   (speculation is not used).
    ///
    /// A list of prompts runs through the engine's continuous-batching scheduler, which takes
    /// all of these (speculating sequences take their own verification passes).
    #[pyo3(signature = (prompts, max_new_tokens = 256, **options))]
    fn generate(
        &self,
        py: Python<'_>,
        prompts: &Bound<'_, PyAny>,
        max_new_tokens: i64,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Vec<RequestOutput>> {
        let texts: Vec<String> = if prompts.is_instance_of::<PyString>() {
            vec![prompts.extract()?]
        } else {
            prompts.extract().map_err(|_| PyTypeError::new_err("prompts: expected a string or a list of strings"))?
        };
        let o = Options::from_kwargs("generate", max_new_tokens, options)?;
        let shared = &self.shared;
        let ids = texts
            .iter()
            .enumerate()
            .map(|(i, t)| shared.encode_prompt(t, &format!("prompts[{i}]")))
            .collect::<PyResult<Vec<_>>>()?;
        let outs = detached(py, |cancel| {
            let params = o.params(shared, None)?;
            generate_many(shared, &ids, &params, cancel, &mut |_, _| std::ops::ControlFlow::Continue(()))
                .map_err(|e| to_py(&e))
        })?;
        Ok(outs.into_iter().map(RequestOutput::from).collect())
    }

    /// Yields the text of one generation in pieces as they are produced. `prompt` is a string
    /// (a plain prompt) or a list of chat messages (the chat template is applied). The
    /// iterator's `output` holds the whole RequestOutput once it is exhausted. Takes the same
    /// keyword arguments as generate().
    #[pyo3(signature = (prompt, max_new_tokens = 256, **options))]
    fn stream(
        &self,
        py: Python<'_>,
        prompt: &Bound<'_, PyAny>,
        max_new_tokens: i64,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<TextStream> {
        let o = Options::from_kwargs("stream", max_new_tokens, options)?;
        let shared = &self.shared;
        let (ids, harmony) = if prompt.is_instance_of::<PyString>() {
            (shared.encode_prompt(&prompt.extract::<String>()?, "the prompt")?, None)
        } else if prompt.is_instance_of::<PyList>() {
            (shared.encode_chat(&messages(prompt)?)?, shared.harmony())
        } else {
            return Err(PyTypeError::new_err("prompt: expected a string or a list of chat messages"));
        };
        let params = detached(py, |_| o.params(shared, harmony))?;
        Ok(TextStream::start(self.shared.clone(), ids, params))
    }

    /// Answers a conversation: `messages` is a list of {"role": ..., "content": ...} dicts,
    /// rendered with the model's chat template and the assistant's turn opened. Returns one
    /// RequestOutput; for harmony models (GPT-OSS) `text` is the final answer and `reasoning`
    /// the analysis. Takes the same keyword arguments as generate() (a grammar constrains the
    /// whole harmony output, its channel markers included).
    #[pyo3(signature = (messages, max_new_tokens = 256, **options))]
    fn chat(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        max_new_tokens: i64,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<RequestOutput> {
        let o = Options::from_kwargs("chat", max_new_tokens, options)?;
        let shared = &self.shared;
        let ids = shared.encode_chat(&crate::tokenizer::messages(messages)?)?;
        let harmony = shared.harmony();
        let mut outs = detached(py, |cancel| {
            let params = o.params(shared, harmony)?;
            generate_many(shared, &[ids], &params, cancel, &mut |_, _| std::ops::ControlFlow::Continue(()))
                .map_err(|e| to_py(&e))
        })?;
        outs.pop().map(RequestOutput::from).ok_or_else(|| value_error("no output"))
    }

    /// The model's tokenizer and chat template.
    #[getter]
    fn tokenizer(&self) -> PyTokenizer {
        PyTokenizer::new(self.shared.clone())
    }

    /// The model: architecture, context (positions), weight bytes, layers, device and more.
    #[getter]
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = &self.shared;
        let i = s.chat.model.info();
        let d = PyDict::new(py);
        d.set_item("architecture", &i.architecture)?;
        d.set_item("context", i.max_positions)?;
        d.set_item("weight_bytes", i.weight_bytes)?;
        d.set_item("weight_bytes_per_token", i.weight_bytes_per_token)?;
        d.set_item("kv_bytes_per_position", i.kv_bytes_per_position)?;
        d.set_item("n_layers", i.n_layers)?;
        d.set_item("hidden_size", i.hidden_size)?;
        d.set_item("vocab_size", i.vocab_size)?;
        d.set_item("eos_token_ids", &s.chat.eos_token_ids)?;
        d.set_item("device", &s.loaded.model_backend_name)?;
        d.set_item("model_dir", s.loaded.dir.display().to_string())?;
        d.set_item("load_s", s.loaded.load_time.as_secs_f64())?;
        Ok(d)
    }

    /// Where each decoder layer lives, as a dict: "tiers" (one of "vram", "ram", "disk" per
    /// layer; on the CPU "vram" means the backend's own memory), "layers" (the layer indices of
    /// each tier), the slots streamed layers rotate through, predicted peak "vram_bytes" and
    /// pinned "ram_bytes", an offloaded KV cache ("kv_offload"), MoE "experts", and
    /// "description", the CLI's one-line summary (which says RAM for the CPU's own memory).
    /// "streamed" says whether the model was loaded by this plan (a GPU, or budgets given) or
    /// sits whole in memory.
    fn plan<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = &self.shared;
        let p: Plan = match &s.loaded.plan {
            Some(p) => p.clone(),
            None => {
                let chosen = Chosen { backend: s.loaded.backend.clone() };
                make_plan(&s.loaded.dir, &chosen, &s.budgets, None).map_err(|e| to_py(&e))?.0
            }
        };
        plan_dict(py, &p, s.loaded.plan.is_some(), s.loaded.backend.memory_kind())
    }

    fn __repr__(&self) -> String {
        let s = &self.shared;
        format!(
            "LLM(model={:?}, architecture={:?}, device={:?})",
            s.loaded.dir.display().to_string(),
            s.chat.model.info().architecture,
            s.loaded.model_backend_name
        )
    }
}

fn plan_dict<'py>(py: Python<'py>, p: &Plan, streamed: bool, memory: MemoryKind) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let tiers: Vec<String> = p.tiers.iter().map(Tier::to_string).collect();
    let layers = PyDict::new(py);
    for t in [Tier::Vram, Tier::Ram, Tier::Disk] {
        let idx: Vec<usize> = p.tiers.iter().enumerate().filter(|(_, x)| **x == t).map(|(i, _)| i).collect();
        layers.set_item(t.to_string(), idx)?;
    }
    d.set_item("streamed", streamed)?;
    d.set_item("tiers", tiers)?;
    d.set_item("layers", layers)?;
    d.set_item("slots", p.slots)?;
    d.set_item("slot_bytes", p.slot_bytes)?;
    d.set_item("staging_buffers", p.staging_buffers)?;
    d.set_item("vram_bytes", p.vram_bytes)?;
    d.set_item("ram_bytes", p.ram_bytes)?;
    match p.kv {
        Some(k) => {
            let kv = PyDict::new(py);
            kv.set_item("block", k.block)?;
            kv.set_item("ram_bytes", k.ram_bytes)?;
            kv.set_item("window_bytes", k.window_bytes)?;
            kv.set_item("window_positions", k.window_positions)?;
            d.set_item("kv_offload", kv)?;
        }
        None => d.set_item("kv_offload", py.None())?,
    }
    match &p.experts {
        Some(e) => {
            let x = PyDict::new(py);
            x.set_item("slots", e.slots)?;
            x.set_item("ram_layers", e.ram_layers.clone())?;
            d.set_item("experts", x)?;
        }
        None => d.set_item("experts", py.None())?,
    }
    d.set_item("description", describe(p, memory))?;
    Ok(d)
}
