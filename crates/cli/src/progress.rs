//! Where first-use provisioning (downloads, extraction, GGUF import) reports progress.
//!
//! By default: lines on standard error and indicatif bars, which draw only on a terminal. A host
//! process can install a [`Sink`] instead (the Python package does, so that Jupyter, whose
//! kernel's standard error is not the notebook, shows the lines): then every line and every
//! bar's updates go to it as text, a bar as one line rewritten with `\r` in steps of 5%.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Receives text to show as it is: lines end with `\n`, a bar's updates start with `\r`.
pub type Sink = Arc<dyn Fn(&str) + Send + Sync>;

static SINK: RwLock<Option<Sink>> = RwLock::new(None);

/// Sends progress to `sink` from now on (None: back to standard error).
pub fn set_sink(sink: Option<Sink>) {
    if let Ok(mut s) = SINK.write() {
        *s = sink;
    }
}

fn sink() -> Option<Sink> {
    SINK.read().ok().and_then(|s| s.clone())
}

/// One line of progress (`[ollm] first use of …`).
pub fn note(line: &str) {
    match sink() {
        Some(s) => s(&format!("{line}\n")),
        None => eprintln!("{line}"),
    }
}

/// A progress bar (bytes) or spinner: indicatif on standard error, or `\r` lines to the sink.
pub struct Bar {
    inner: Inner,
}

enum Inner {
    Term(ProgressBar),
    /// The sink, the message, and (total, done, last percentage shown).
    Sink {
        sink: Sink,
        msg: String,
        state: Mutex<(u64, u64, Option<u64>)>,
    },
}

impl Bar {
    /// A bar of `total` bytes (0 when not known yet: [`set_length`](Self::set_length)).
    pub fn bytes(total: u64, msg: &str, template: &str) -> Self {
        match sink() {
            Some(sink) => Self::to_sink(sink, msg, total),
            None => {
                let bar = ProgressBar::new(total).with_message(msg.to_string());
                bar.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
                Self { inner: Inner::Term(bar) }
            }
        }
    }

    /// A spinner for work of unknown length.
    pub fn spinner(msg: &str) -> Self {
        match sink() {
            Some(sink) => {
                sink(&format!("{msg}…\n"));
                Self::to_sink(sink, msg, 0)
            }
            None => {
                let bar = ProgressBar::new_spinner().with_message(msg.to_string());
                bar.enable_steady_tick(Duration::from_millis(120));
                Self { inner: Inner::Term(bar) }
            }
        }
    }

    fn to_sink(sink: Sink, msg: &str, total: u64) -> Self {
        Self { inner: Inner::Sink { sink, msg: msg.to_string(), state: Mutex::new((total, 0, None)) } }
    }

    pub fn set_length(&self, total: u64) {
        match &self.inner {
            Inner::Term(b) => b.set_length(total),
            Inner::Sink { state, .. } => {
                if let Ok(mut s) = state.lock() {
                    s.0 = total;
                }
            }
        }
    }

    pub fn set_position(&self, done: u64) {
        match &self.inner {
            Inner::Term(b) => b.set_position(done),
            Inner::Sink { sink, msg, state } => {
                let Ok(mut s) = state.lock() else { return };
                s.1 = done;
                if s.0 == 0 {
                    return;
                }
                // Every 5%: a notebook redraws the line, a log keeps 20 of them at most.
                let pct = (done.min(s.0) * 100 / s.0) / 5 * 5;
                if s.2 != Some(pct) {
                    s.2 = Some(pct);
                    sink(&format!("\r{msg}: {pct:>3}% of {}", crate::resources::human_bytes(s.0)));
                }
            }
        }
    }

    pub fn inc(&self, n: u64) {
        match &self.inner {
            Inner::Term(b) => b.inc(n),
            Inner::Sink { state, .. } => {
                let done = state.lock().map_or(0, |s| s.1) + n;
                self.set_position(done);
            }
        }
    }

    /// Ends the bar: indicatif clears it; the sink gets the line's end.
    pub fn finish(&self) {
        match &self.inner {
            Inner::Term(b) => b.finish_and_clear(),
            Inner::Sink { sink, state, .. } => {
                // A bar that showed a step ends its line; a spinner's line is already complete.
                if state.lock().is_ok_and(|s| s.0 > 0 && s.2.is_some()) {
                    sink("\n");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sink_gets_lines_and_bar_steps() {
        let seen = Arc::new(Mutex::new(String::new()));
        let s = seen.clone();
        set_sink(Some(Arc::new(move |t: &str| s.lock().expect("lock").push_str(t))));
        note("[ollm] hello");
        let bar = Bar::bytes(0, "extracting x", "{msg}");
        bar.set_length(1000);
        for _ in 0..100 {
            bar.inc(10);
        }
        bar.finish();
        set_sink(None);
        let text = seen.lock().expect("lock").clone();
        assert!(text.starts_with("[ollm] hello\n"), "{text}");
        // 0%, 5%, …, 100%: 21 updates, then the line's end.
        assert_eq!(text.matches('\r').count(), 21, "{text:?}");
        assert!(text.ends_with("\rextracting x: 100% of 1000 B\n"), "{text:?}");
    }
}
