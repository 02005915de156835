//! Dumps every tensor of a GGUF file as raw little-endian f32 (file order, fastest dimension
//! innermost) to `<out_dir>/<tensor name>.f32`, for comparing our dequantisation against
//! gguf-py's (`scripts/check_gguf_dequant.py`).
//!
//! Usage: cargo run --release -p ollm-weights --example gguf_to_f32 -- <file.gguf> <out_dir>

use std::path::PathBuf;

use ollm_weights::format::gguf::GgufFile;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, gguf, out_dir] = args.as_slice() else {
        return Err("usage: gguf_to_f32 <file.gguf> <out_dir>".into());
    };
    let out_dir = PathBuf::from(out_dir);
    std::fs::create_dir_all(&out_dir)?;
    let file = GgufFile::open(&PathBuf::from(gguf))?;
    for t in file.tensors() {
        let values = file.read_f32(t)?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(out_dir.join(format!("{}.f32", t.name)), bytes)?;
        println!("{} {} {:?}", t.name, t.ggml_type, t.dims);
    }
    Ok(())
}
