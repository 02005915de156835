//! `ollm_rs._ollm_rs`: the Python extension module. [`LLM`](llm::Llm) loads a model as the
//! `ollm` CLI does (`ollm_cli::loaded`) and generates with `ollm_engine`; the GIL is released
//! while the engine computes and Ctrl-C ends a generation with `KeyboardInterrupt`.

mod batch;
mod errors;
mod interrupt;
mod llm;
mod output;
mod params;
mod stream;
mod tokenizer;

use std::io::IsTerminal;
use std::sync::Arc;

use pyo3::prelude::*;

/// Tensors on 2 MiB boundaries, so huge pages back all of each (`ollm_ops::cpu::HugePageAlloc`).
#[cfg(unix)]
#[global_allocator]
static ALLOC: ollm_ops::cpu::HugePageAlloc = ollm_ops::cpu::HugePageAlloc;

/// Where provisioning's progress goes when standard error is not a terminal (Jupyter, a log):
/// Python's `sys.stderr`, which a notebook shows under the cell.
fn progress_to_python() {
    if std::io::stderr().is_terminal() {
        return;
    }
    ollm_cli::progress::set_sink(Some(Arc::new(|text: &str| {
        Python::attach(|py| {
            let write = || -> PyResult<()> {
                let err = py.import("sys")?.getattr("stderr")?;
                if !err.is_none() {
                    err.call_method1("write", (text,))?;
                    err.call_method0("flush")?;
                }
                Ok(())
            };
            // Progress is best effort: a closed or odd sys.stderr must not fail a load.
            let _ = write();
        });
    })));
}

#[pymodule]
fn _ollm_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    progress_to_python();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<llm::Llm>()?;
    m.add_class::<tokenizer::PyTokenizer>()?;
    m.add_class::<output::RequestOutput>()?;
    m.add_class::<output::Usage>()?;
    m.add_class::<output::Stats>()?;
    m.add_class::<stream::TextStream>()?;
    Ok(())
}
