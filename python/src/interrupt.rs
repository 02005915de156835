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
    let cancel = CancelCheck::new(move || seen.check());
    let out = py.detach(|| work(&cancel));
    match interrupt.take() {
        Some(e) => Err(e),
        None => out,
    }
}
