//! Imports a llama GGUF into a Hugging Face model directory, printing progress.
//!
//! Usage: cargo run --release -p ollm-weights --example import_gguf -- <file.gguf> <out_dir>

use std::path::PathBuf;

use ollm_weights::format::gguf::import_gguf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, gguf, out_dir] = args.as_slice() else {
        return Err("usage: import_gguf <file.gguf> <out_dir>".into());
    };
    let start = std::time::Instant::now();
    let mut last_pct = u64::MAX;
    let summary = import_gguf(&PathBuf::from(gguf), &PathBuf::from(out_dir), &mut |done, total| {
        let pct = if total == 0 { 100 } else { done * 100 / total };
        if pct / 10 != last_pct / 10 {
            eprintln!("{pct:3}% ({done} of {total} bytes)");
            last_pct = pct;
        }
    })?;
    println!("{summary:#?}");
    println!("took {:.2} s", start.elapsed().as_secs_f64());
    Ok(())
}
