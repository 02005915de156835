//! `LLM.stream(...)`: text pieces as they are produced.
//!
//! The generation runs on a thread of its own and sends each piece through a channel; the
//! iterator waits for the next one with the GIL released, in short waits between which it asks
//! `Python::check_signals`, so Ctrl-C raises `KeyboardInterrupt` from `next()` and tells the
//! generation to stop. Dropping the iterator (a `break` out of the loop) stops it too.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ollm_engine::{CancelCheck, GenerateParams, Generation};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::batch::generate_many;
use crate::errors::to_py;
use crate::llm::Shared;
use crate::output::RequestOutput;

/// How long one wait for a piece lasts before signals are checked again.
const POLL: Duration = Duration::from_millis(50);

enum Msg {
    Piece(String),
    Done(Box<anyhow::Result<Generation>>),
}

/// An iterator over the text pieces of one generation.
#[pyclass(module = "ollm_rs", frozen)]
pub struct TextStream {
    rx: Mutex<Option<Receiver<Msg>>>,
    stop: Arc<AtomicBool>,
    output: Mutex<Option<RequestOutput>>,
}

impl TextStream {
    /// Starts the generation on its own thread.
    pub fn start(shared: Arc<Shared>, ids: Vec<u32>, params: GenerateParams) -> Self {
        let (tx, rx) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = stop.clone();
        std::thread::spawn(move || run(&shared, ids, params, seen, tx));
        Self { rx: Mutex::new(Some(rx)), stop, output: Mutex::new(None) }
    }
}

fn run(shared: &Shared, ids: Vec<u32>, params: GenerateParams, stop: Arc<AtomicBool>, tx: Sender<Msg>) {
    let seen = stop.clone();
    let cancel = CancelCheck::new(move || seen.load(Ordering::Relaxed));
    let result = generate_many(shared, &[ids], &params, &cancel, &mut |_, ev| {
        if ev.text.is_empty() {
            return ControlFlow::Continue(());
        }
        // The iterator is gone: nobody reads on.
        match tx.send(Msg::Piece(ev.text.to_string())) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    });
    let done = result.and_then(|mut g| g.pop().ok_or_else(|| anyhow::anyhow!("the generation was cancelled")));
    let _ = tx.send(Msg::Done(Box::new(done)));
}

#[pymethods]
impl TextStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        loop {
            let got = {
                // One reader at a time: a second thread would wait on this lock holding the GIL
                // that the first needs back.
                let mut guard = self
                    .rx
                    .try_lock()
                    .map_err(|_| PyRuntimeError::new_err("this stream is being read by another thread"))?;
                let Some(rx) = guard.take() else { return Ok(None) };
                let (rx, got) = py.detach(move || {
                    let got = rx.recv_timeout(POLL);
                    (rx, got)
                });
                *guard = Some(rx);
                got
            };
            match got {
                Ok(Msg::Piece(s)) => return Ok(Some(s)),
                Ok(Msg::Done(result)) => {
                    self.finish();
                    let g = (*result).map_err(|e| to_py(&e))?;
                    if let Ok(mut out) = self.output.lock() {
                        *out = Some(RequestOutput::from(g));
                    }
                    return Ok(None);
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(e) = py.check_signals() {
                        self.close();
                        return Err(e);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.finish();
                    return Err(PyRuntimeError::new_err("the generation thread ended without a result"));
                }
            }
        }
    }

    /// Stops the generation (the pieces not read are dropped).
    fn close(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.finish();
    }

    /// The whole result (text, token ids, finish reason, usage, stats) once the stream is
    /// exhausted; None before.
    #[getter]
    fn output(&self) -> Option<RequestOutput> {
        self.output.lock().ok().and_then(|o| o.clone())
    }
}

impl TextStream {
    /// No more reading: the receiver goes, so the generation's next send fails and it stops.
    fn finish(&self) {
        if let Ok(mut rx) = self.rx.lock() {
            rx.take();
        }
    }
}

impl Drop for TextStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
