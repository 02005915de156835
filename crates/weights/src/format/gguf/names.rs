//! GGUF tensor names → Hugging Face names (docs/models.md §7.1) for the llama, qwen2, qwen3 and
//! gemma3 architectures, and the q/k row un-permutation of llama files (§7.2).

/// Which output-row permutation llama.cpp's converter applied to a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permute {
    None,
    /// attn_q: permuted with n = head_count.
    Query,
    /// attn_k: permuted with n = head_count_kv.
    Key,
}

/// Where a GGUF tensor goes in the HF checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HfTarget {
    pub name: String,
    /// Decoder layer, for `blk.{l}.*` tensors.
    pub layer: Option<usize>,
    pub permute: Permute,
}

/// The GGUF architectures the importer reads (`general.architecture`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
}

impl Arch {
    pub const SUPPORTED: &'static str = "llama, qwen2, qwen3, gemma3";

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            "qwen3" => Some(Arch::Qwen3),
            "gemma3" => Some(Arch::Gemma3),
            _ => None,
        }
    }

    /// The metadata key prefix (`llama.`, `gemma3.` …).
    pub fn prefix(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
        }
    }
}

/// The HF name of a llama GGUF tensor, or `None` for names with no HF counterpart (including
/// `rope_freqs.weight`, which the importer turns into config.json's rope_scaling).
pub fn hf_target(gguf_name: &str) -> Option<HfTarget> {
    hf_target_for(Arch::Llama, gguf_name)
}

/// The HF name of a GGUF tensor of architecture `arch`, or `None` for names with no HF
/// counterpart there. Only llama files have permuted q/k rows (llama.cpp's converter permutes
/// for its llama architecture alone).
pub fn hf_target_for(arch: Arch, gguf_name: &str) -> Option<HfTarget> {
    let top = |name: &str| Some(HfTarget { name: name.to_string(), layer: None, permute: Permute::None });
    match gguf_name {
        "token_embd.weight" => return top("model.embed_tokens.weight"),
        "output_norm.weight" => return top("model.norm.weight"),
        "output.weight" => return top("lm_head.weight"),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    // Reject "01" or "+1": the converter writes plain decimal layer numbers.
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) || (layer.len() > 1 && layer.starts_with('0')) {
        return None;
    }
    let l: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let llama = arch == Arch::Llama;
    let weight = suffix == "weight";
    let (hf_module, permute) = match module {
        "attn_norm" if weight => ("input_layernorm", Permute::None),
        "ffn_norm" if weight && arch == Arch::Gemma3 => ("pre_feedforward_layernorm", Permute::None),
        "ffn_norm" if weight => ("post_attention_layernorm", Permute::None),
        "post_attention_norm" if weight && arch == Arch::Gemma3 => ("post_attention_layernorm", Permute::None),
        "post_ffw_norm" if weight && arch == Arch::Gemma3 => ("post_feedforward_layernorm", Permute::None),
        "attn_q_norm" if weight && matches!(arch, Arch::Qwen3 | Arch::Gemma3) => ("self_attn.q_norm", Permute::None),
        "attn_k_norm" if weight && matches!(arch, Arch::Qwen3 | Arch::Gemma3) => ("self_attn.k_norm", Permute::None),
        "attn_q" if llama => ("self_attn.q_proj", Permute::Query),
        "attn_k" if llama => ("self_attn.k_proj", Permute::Key),
        "attn_q" => ("self_attn.q_proj", Permute::None),
        "attn_k" => ("self_attn.k_proj", Permute::None),
        "attn_v" => ("self_attn.v_proj", Permute::None),
        "attn_output" => ("self_attn.o_proj", Permute::None),
        "ffn_gate" => ("mlp.gate_proj", Permute::None),
        "ffn_up" => ("mlp.up_proj", Permute::None),
        "ffn_down" => ("mlp.down_proj", Permute::None),
        _ => return None,
    };
    Some(HfTarget { name: format!("model.layers.{l}.{hf_module}.{suffix}"), layer: Some(l), permute })
}

/// Undoes the converter's q/k permutation on whole rows of `row_bytes` bytes each
/// (before or after dequantisation alike). Per head of `d = n_rows / n_heads` rows:
/// HF row `h·d + c·(d/2) + i` = GGUF row `h·d + 2i + c` (c ∈ {0, 1}, i < d/2).
/// `None` when the rows do not split into `n_heads` heads of even size.
pub fn unpermute_rows<T: Copy>(src: &[T], row_len: usize, n_heads: usize) -> Option<Vec<T>> {
    if row_len == 0 || n_heads == 0 || !src.len().is_multiple_of(row_len) {
        return None;
    }
    let n_rows = src.len() / row_len;
    if !n_rows.is_multiple_of(n_heads) || !(n_rows / n_heads).is_multiple_of(2) {
        return None;
    }
    let d = n_rows / n_heads;
    let half = d / 2;
    let mut out = Vec::with_capacity(src.len());
    for hf_row in 0..n_rows {
        let (h, r) = (hf_row / d, hf_row % d);
        let (c, i) = (r / half, r % half);
        let gguf_row = h * d + 2 * i + c;
        out.extend_from_slice(&src[gguf_row * row_len..(gguf_row + 1) * row_len]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_llama_names() {
        let t = hf_target("blk.12.attn_q.weight").expect("q");
        assert_eq!(
            (t.name.as_str(), t.layer, t.permute),
            ("model.layers.12.self_attn.q_proj.weight", Some(12), Permute::Query)
        );
        assert_eq!(hf_target("blk.0.attn_k.bias").expect("k bias").permute, Permute::Key);
        assert_eq!(
            hf_target("blk.3.ffn_norm.weight").expect("norm").name,
            "model.layers.3.post_attention_layernorm.weight"
        );
        assert_eq!(hf_target("blk.3.ffn_down.weight").expect("down").name, "model.layers.3.mlp.down_proj.weight");
        assert_eq!(hf_target("output.weight").expect("head").name, "lm_head.weight");
        assert_eq!(hf_target("token_embd.weight").expect("embd").name, "model.embed_tokens.weight");
        for bad in [
            "rope_freqs.weight",
            "blk.x.attn_q.weight",
            "blk.01.attn_q.weight",
            "blk.1.attn_qkv.weight",
            "blk.1.attn_norm.bias",
            "blk.1.attn_q.scale",
        ] {
            assert_eq!(hf_target(bad), None, "{bad}");
        }
    }

    #[test]
    fn maps_qwen_and_gemma_names() {
        let q = hf_target_for(Arch::Qwen2, "blk.2.attn_q.bias").expect("q bias");
        assert_eq!((q.name.as_str(), q.permute), ("model.layers.2.self_attn.q_proj.bias", Permute::None));
        let n = |arch, name| hf_target_for(arch, name).map(|t| t.name);
        assert_eq!(
            n(Arch::Qwen3, "blk.0.attn_k_norm.weight").as_deref(),
            Some("model.layers.0.self_attn.k_norm.weight")
        );
        assert_eq!(
            n(Arch::Qwen3, "blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(
            n(Arch::Gemma3, "blk.1.ffn_norm.weight").as_deref(),
            Some("model.layers.1.pre_feedforward_layernorm.weight")
        );
        assert_eq!(
            n(Arch::Gemma3, "blk.1.post_attention_norm.weight").as_deref(),
            Some("model.layers.1.post_attention_layernorm.weight")
        );
        assert_eq!(
            n(Arch::Gemma3, "blk.1.post_ffw_norm.weight").as_deref(),
            Some("model.layers.1.post_feedforward_layernorm.weight")
        );
        assert_eq!(hf_target_for(Arch::Gemma3, "blk.1.attn_q.weight").expect("q").permute, Permute::None);
        for (arch, bad) in [
            (Arch::Llama, "blk.0.attn_q_norm.weight"),
            (Arch::Qwen2, "blk.0.attn_q_norm.weight"),
            (Arch::Qwen3, "blk.0.post_ffw_norm.weight"),
        ] {
            assert_eq!(hf_target_for(arch, bad), None, "{arch:?} {bad}");
        }
    }

    /// The converter's permutation (docs/models.md §7.2), to check the inverse against.
    fn permute(hf: &[u32], row_len: usize, n_heads: usize) -> Vec<u32> {
        let n_rows = hf.len() / row_len;
        let (d, half) = (n_rows / n_heads, n_rows / n_heads / 2);
        let mut out = vec![0; hf.len()];
        for h in 0..n_heads {
            for i in 0..half {
                for c in 0..2 {
                    let (g, s) = (h * d + 2 * i + c, h * d + c * half + i);
                    out[g * row_len..(g + 1) * row_len].copy_from_slice(&hf[s * row_len..(s + 1) * row_len]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_the_converter() {
        // One head of 4 rows: GGUF rows [A, B, C, D] are HF rows [A, C, B, D].
        assert_eq!(unpermute_rows(&[10, 11, 12, 13], 1, 1), Some(vec![10, 12, 11, 13]));
        let hf: Vec<u32> = (0..3 * 8 * 5).collect(); // 3 heads, d = 8, rows of 5
        assert_eq!(unpermute_rows(&permute(&hf, 5, 3), 5, 3), Some(hf));
        assert_eq!(unpermute_rows(&[0u8; 12], 1, 4), None, "odd head_dim");
        assert_eq!(unpermute_rows(&[0u8; 10], 1, 4), None, "rows not divisible by heads");
    }
}
