//! Many prompts in one call: [`generate_many`] is the one place `LLM.generate(list)` reaches
//! the engine.
//!
//! One prompt runs on a session taken from the model's pool (so a prompt that starts like the
//! previous call's reuses its KV cache). Several run together through the engine's
//! continuous-batching scheduler: up to the model's batch size share each pass over the
//! weights. Either way the outputs, in the prompts' order, equal what each prompt generates
//! alone (greedy), which `tests/test_generate.py` checks.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};

use ollm_engine::{
    CancelCheck, GenerateParams, Generation, Request, Scheduler, SchedulerConfig, Sink, SpecStats, TokenEvent,
    generate_reusing,
};

use crate::llm::Shared;

/// Tokens one scheduler step feeds at most.
const STEP_TOKENS: usize = 2048;

/// What a request's sink hands back to the calling thread.
enum Event {
    Token { id: u32, text: String, reasoning: String, speculation: Option<SpecStats> },
    Done(ollm_engine::Result<Generation>),
}

/// Sends prompt `index`'s events to the calling thread; stops it once `stop` is set.
struct Forward {
    index: usize,
    tx: mpsc::Sender<(usize, Event)>,
    stop: Arc<AtomicBool>,
}

impl Sink for Forward {
    fn token(&mut self, ev: TokenEvent<'_>) -> ControlFlow<()> {
        let e = Event::Token {
            id: ev.id,
            text: ev.text.to_string(),
            reasoning: ev.reasoning.to_string(),
            speculation: ev.speculation,
        };
        let _ = self.tx.send((self.index, e));
        if self.stop.load(Ordering::SeqCst) { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    }

    fn done(&mut self, result: ollm_engine::Result<Generation>) {
        let _ = self.tx.send((self.index, Event::Done(result)));
    }
}

/// Generates for every prompt (token ids) with `params`. `on_token(i, event)` sees prompt
/// `i`'s tokens as they come and may return `Break` to cancel that generation; `cancel` is
/// asked between prefill chunks and between tokens, and once it says true every running
/// generation ends as cancelled. The first error ends the call.
pub fn generate_many(
    shared: &Shared,
    prompts: &[Vec<u32>],
    params: &GenerateParams,
    cancel: &CancelCheck,
    on_token: &mut dyn FnMut(usize, TokenEvent<'_>) -> ControlFlow<()>,
) -> anyhow::Result<Vec<Generation>> {
    if let [prompt] = prompts {
        let params = GenerateParams { cancel: Some(cancel.clone()), ..params.clone() };
        let mut session = shared.take_session()?;
        let g = generate_reusing(&mut session, &shared.chat.tokenizer, prompt, &params, &mut |ev| {
            if cancel.cancelled() {
                return ControlFlow::Break(());
            }
            on_token(0, ev)
        });
        shared.return_session(session);
        return Ok(vec![g?]);
    }
    let model = shared.chat.model.clone();
    let prefix = shared.chat.prefix.clone();
    let max_batch = shared.loaded.default_max_batch().min(prompts.len()).max(1);
    let new_session = {
        let model = model.clone();
        move || ollm_engine::session_with_prefix(model.clone(), prefix.as_ref())
    };
    let cfg = SchedulerConfig { max_batch, step_tokens: STEP_TOKENS };
    let tokenizer = Arc::new(shared.chat.tokenizer.clone());
    let mut sched = Scheduler::new(model, tokenizer, cfg, Box::new(new_session));
    let (tx, rx) = mpsc::channel();
    let mut stops = Vec::with_capacity(prompts.len());
    for (index, prompt) in prompts.iter().enumerate() {
        let stop = Arc::new(AtomicBool::new(false));
        let (all, mine) = (cancel.clone(), stop.clone());
        let check = CancelCheck::new(move || all.cancelled() || mine.load(Ordering::SeqCst));
        let params = GenerateParams { cancel: Some(check), ..params.clone() };
        let sink = Forward { index, tx: tx.clone(), stop: stop.clone() };
        sched.submit(Request { prompt: prompt.clone(), params, sink: Box::new(sink) });
        stops.push(stop);
    }
    drop(tx);
    let mut outs: Vec<Option<ollm_engine::Result<Generation>>> = (0..prompts.len()).map(|_| None).collect();
    loop {
        for (i, e) in rx.try_iter() {
            match e {
                Event::Token { id, text, reasoning, speculation } => {
                    // The Python API asks for no logprobs.
                    let ev = TokenEvent { id, text: &text, reasoning: &reasoning, logprob: None, speculation };
                    if on_token(i, ev).is_break() {
                        stops[i].store(true, Ordering::SeqCst);
                    }
                }
                Event::Done(r) => outs[i] = Some(r),
            }
        }
        if sched.is_idle() {
            break;
        }
        sched.step();
    }
    let mut done = Vec::with_capacity(outs.len());
    for out in outs.into_iter().flatten() {
        done.push(out?);
    }
    Ok(done)
}
