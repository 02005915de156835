//! `ollm import-gguf`: convert a llama-architecture GGUF file into a Hugging Face directory.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use ollm_weights::format::gguf::import_gguf;

#[derive(Debug, Args)]
pub struct ImportGgufArgs {
    /// The .gguf file.
    pub file: PathBuf,
    /// The directory to create (config.json, model.safetensors in bf16, tokenizer files).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: ImportGgufArgs) -> anyhow::Result<()> {
    if a.out.exists() {
        anyhow::bail!("{} already exists; choose a new --out directory (nothing was overwritten)", a.out.display());
    }
    import_with_progress(&a.file, &a.out)?;
    eprintln!("[ollm] imported {} into {}", a.file.display(), a.out.display());
    Ok(())
}

/// Imports with a progress bar on stderr (hidden when stderr is not a terminal), or through the
/// progress sink a host installed ([`crate::progress`]).
pub fn import_with_progress(gguf: &Path, out: &Path) -> anyhow::Result<()> {
    let bar = crate::progress::Bar::bytes(0, "importing", "{msg} {bar:30} {bytes}/{total_bytes} {eta}");
    import_gguf(gguf, out, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .with_context(|| format!("importing {}", gguf.display()))?;
    bar.finish();
    Ok(())
}
