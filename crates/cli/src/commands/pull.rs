//! `ollm pull ORG/NAME [--revision R]`: download a safetensors model from the Hugging Face hub.

use clap::Args;

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The hub id, ORG/NAME (e.g. HuggingFaceTB/SmolLM2-135M-Instruct).
    pub repo: String,
    /// A branch, tag or commit (default: main).
    #[arg(long)]
    pub revision: Option<String>,
}

pub fn run(a: PullArgs) -> anyhow::Result<()> {
    let dir = crate::hub::pull(&a.repo, a.revision.as_deref())?;
    eprintln!("[ollm] {} is in {}", a.repo, dir.display());
    println!("{}", dir.display());
    Ok(())
}
