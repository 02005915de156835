//! Running engine work with the GIL released while Ctrl-C still works.
//!
//! Python runs signal handlers on the main thread only, and only when that thread runs Python
//! code. While the engine computes, [`Interrupt::check`] takes the GIL for a moment (between
//! tokens, between prefill chunks) and asks `Python::check_signals`; a raised `KeyboardInterrupt`
//! is kept and the generation told to stop, and [`detached`] returns it once the engine is done.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ollm_engine::CancelCheck;
use pyo3::prelude::*;

/// Whether a signal handler raised (Ctrl-C), and its exception.
#[derive(Default)]
pub struct Interrupt {
    raised: AtomicBool,
    error: Mutex<Option<PyErr>>,
}

impl Interrupt {
    /// True once a signal handler has raised: the caller stops. Cheap after that.
    pub fn check(&self) -> bool {
        if self.raised.load(Ordering::Relaxed) {
            return true;
        }
        if let Err(e) = Python::attach(|py| py.check_signals()) {
            if let Ok(mut slot) = self.error.lock() {
                slot.get_or_insert(e);
            }
            self.raised.store(true, Ordering::Relaxed);
            return true;
        }
        false
    }

    fn take(&self) -> Option<PyErr> {
        self.error.lock().ok().and_then(|mut e| e.take())
    }
}

/// Runs `work` with the GIL released; it should call [`Interrupt::check`] often (the
/// [`CancelCheck`] it is given does). A signal handler's exception (`KeyboardInterrupt`) wins
/// over `work`'s result.
pub fn detached<T: Send>(py: Python<'_>, work: impl FnOnce(&CancelCheck) -> PyResult<T> + Send) -> PyResult<T> {
    let interrupt = Arc::new(Interrupt::default());
    let seen = interrupt.clone();
    // Signal handlers run on the main thread only: elsewhere there is nothing to ask, and not
    // taking the GIL per token leaves it to the threads that run Python.
    let cancel = if on_main_thread(py) { CancelCheck::new(move || seen.check()) } else { CancelCheck::new(|| false) };
    let out = py.detach(|| work(&cancel));
    match interrupt.take() {
        Some(e) => Err(e),
        None => out,
    }
}

/// Whether the calling thread is Python's main thread (where signal handlers run).
fn on_main_thread(py: Python<'_>) -> bool {
    let check = || -> PyResult<bool> {
        let threading = py.import("threading")?;
        let main = threading.call_method0("main_thread")?;
        Ok(threading.call_method0("current_thread")?.is(&main))
    };
    // When in doubt, ask: a check that finds nothing costs a moment with the GIL.
    check().unwrap_or(true)
}
