//! `ollm_rs.LLM`: a loaded model with its tokenizer, and the calls that generate from it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ollm_cli::commands::{ModelArgs, parse_device};
use ollm_cli::loaded::{Chosen, Loaded, load_embedded, load_text};
use ollm_cli::planning::{Budgets, describe, make_plan};
use ollm_engine::{ChatModel, HarmonyMarkers, Session};
use ollm_residency::plan::{Plan, Tier};
use ollm_tokenizer::ChatMessage;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use crate::batch::generate_many;
use crate::errors::{engine, to_py, value_error};
use crate::interrupt::detached;
use crate::output::RequestOutput;
use crate::params::Knobs;
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

/// `stop=`: a string or a list of strings.
fn stops(v: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<String>> {
    match v.filter(|v| !v.is_none()) {
        None => Ok(Vec::new()),
        Some(v) if v.is_instance_of::<PyString>() => Ok(vec![v.extract()?]),
        Some(v) => v.extract().map_err(|_| PyTypeError::new_err("stop: expected a string or a list of strings")),
    }
}

/// Run-time settings shared by generate, stream and chat.
#[allow(clippy::too_many_arguments)]
fn knobs(
    max_new_tokens: i64,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<&Bound<'_, PyAny>>,
    ignore_eos: bool,
) -> PyResult<Knobs> {
    Ok(Knobs {
        max_new_tokens,
        temperature,
        top_p,
        top_k,
        min_p,
        repetition_penalty,
        seed,
        stop: stops(stop)?,
        ignore_eos,
    })
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
        };
        let budgets = args.budgets();
        let shared = detached(py, |_| {
            let load = || -> anyhow::Result<Shared> {
                let loaded = load_embedded(&args)?;
                let text = load_text(&loaded.dir)?;
                let chat = loaded.chat_model(text);
                Ok(Shared { loaded, chat, budgets, idle: Mutex::new(Vec::new()) })
            };
            load().map_err(|e| to_py(&e))
        })?;
        Ok(Self { shared: Arc::new(shared) })
    }

    /// Generates for each prompt (a string, or a list of strings) and returns a list of
    /// outputs in the same order. Unset sampling settings take the model's defaults
    /// (generation_config.json; greedy when it does not ask for sampling); temperature=0 is
    /// greedy. `stop` ends a generation where the text appears (not included); `seed` makes
    /// sampling repeatable (default: a random one).
    #[pyo3(signature = (
        prompts, max_new_tokens = 256, temperature = None, top_p = None, top_k = None, min_p = None,
        repetition_penalty = None, seed = None, stop = None, ignore_eos = false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompts: &Bound<'_, PyAny>,
        max_new_tokens: i64,
        temperature: Option<f32>,
        top_p: Option<f32>,
        top_k: Option<i64>,
        min_p: Option<f32>,
        repetition_penalty: Option<f32>,
        seed: Option<u64>,
        stop: Option<&Bound<'_, PyAny>>,
        ignore_eos: bool,
    ) -> PyResult<Vec<RequestOutput>> {
        let texts: Vec<String> = if prompts.is_instance_of::<PyString>() {
            vec![prompts.extract()?]
        } else {
            prompts.extract().map_err(|_| PyTypeError::new_err("prompts: expected a string or a list of strings"))?
        };
        let k = knobs(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, ignore_eos)?;
        let shared = &self.shared;
        let params = k.params(&shared.chat, None)?;
        let ids = texts
            .iter()
            .enumerate()
            .map(|(i, t)| shared.encode_prompt(t, &format!("prompts[{i}]")))
            .collect::<PyResult<Vec<_>>>()?;
        let outs = detached(py, |cancel| {
            generate_many(shared, &ids, &params, cancel, &mut |_, _| std::ops::ControlFlow::Continue(()))
                .map_err(|e| to_py(&e))
        })?;
        Ok(outs.into_iter().map(RequestOutput::from).collect())
    }

    /// Yields the text of one generation in pieces as they are produced. `prompt` is a string
    /// (a plain prompt) or a list of chat messages (the chat template is applied). The
    /// iterator's `output` holds the whole RequestOutput once it is exhausted. Takes the same
    /// settings as generate().
    #[pyo3(signature = (
        prompt, max_new_tokens = 256, temperature = None, top_p = None, top_k = None, min_p = None,
        repetition_penalty = None, seed = None, stop = None, ignore_eos = false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        prompt: &Bound<'_, PyAny>,
        max_new_tokens: i64,
        temperature: Option<f32>,
        top_p: Option<f32>,
        top_k: Option<i64>,
        min_p: Option<f32>,
        repetition_penalty: Option<f32>,
        seed: Option<u64>,
        stop: Option<&Bound<'_, PyAny>>,
        ignore_eos: bool,
    ) -> PyResult<TextStream> {
        let k = knobs(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, ignore_eos)?;
        let shared = &self.shared;
        let (ids, harmony) = if prompt.is_instance_of::<PyString>() {
            (shared.encode_prompt(&prompt.extract::<String>()?, "the prompt")?, None)
        } else if prompt.is_instance_of::<PyList>() {
            (shared.encode_chat(&messages(prompt)?)?, shared.harmony())
        } else {
            return Err(PyTypeError::new_err("prompt: expected a string or a list of chat messages"));
        };
        let params = k.params(&shared.chat, harmony)?;
        Ok(TextStream::start(self.shared.clone(), ids, params))
    }

    /// Answers a conversation: `messages` is a list of {"role": ..., "content": ...} dicts,
    /// rendered with the model's chat template and the assistant's turn opened. Returns one
    /// RequestOutput; for harmony models (GPT-OSS) `text` is the final answer and `reasoning`
    /// the analysis. Takes the same settings as generate().
    #[pyo3(signature = (
        messages, max_new_tokens = 256, temperature = None, top_p = None, top_k = None, min_p = None,
        repetition_penalty = None, seed = None, stop = None, ignore_eos = false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn chat(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        max_new_tokens: i64,
        temperature: Option<f32>,
        top_p: Option<f32>,
        top_k: Option<i64>,
        min_p: Option<f32>,
        repetition_penalty: Option<f32>,
        seed: Option<u64>,
        stop: Option<&Bound<'_, PyAny>>,
        ignore_eos: bool,
    ) -> PyResult<RequestOutput> {
        let k = knobs(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, ignore_eos)?;
        let shared = &self.shared;
        let ids = shared.encode_chat(&crate::tokenizer::messages(messages)?)?;
        let params = k.params(&shared.chat, shared.harmony())?;
        let mut outs = detached(py, |cancel| {
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
    /// "description", the CLI's one-line summary. "streamed" says whether the model was loaded
    /// by this plan (a GPU, or budgets given) or sits whole in memory.
    fn plan<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = &self.shared;
        let p: Plan = match &s.loaded.plan {
            Some(p) => p.clone(),
            None => {
                let chosen = Chosen { backend: s.loaded.backend.clone() };
                make_plan(&s.loaded.dir, &chosen, &s.budgets, None).map_err(|e| to_py(&e))?.0
            }
        };
        plan_dict(py, &p, s.loaded.plan.is_some())
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

fn plan_dict<'py>(py: Python<'py>, p: &Plan, streamed: bool) -> PyResult<Bound<'py, PyDict>> {
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
    d.set_item("description", describe(p))?;
    Ok(d)
}
