//! Where the prompt comes from: `--prompt`, `--prompt-file` or standard input.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use anyhow::{Context, bail};

pub fn read_prompt(prompt: Option<String>, file: Option<PathBuf>) -> anyhow::Result<String> {
    let text = match (prompt, file) {
        (Some(_), Some(_)) => bail!("give either --prompt or --prompt-file, not both"),
        (Some(p), None) => p,
        (None, Some(f)) => {
            std::fs::read_to_string(&f).with_context(|| format!("cannot read --prompt-file {}", f.display()))?
        }
        (None, None) => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                bail!("no prompt: give --prompt TEXT, --prompt-file FILE, or pipe text into standard input");
            }
            let mut s = String::new();
            stdin.lock().read_to_string(&mut s).context("cannot read the prompt from standard input")?;
            s
        }
    };
    if text.trim().is_empty() {
        bail!("the prompt is empty: give some text with --prompt, --prompt-file or standard input");
    }
    Ok(text)
}
