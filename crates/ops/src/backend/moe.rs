//! [`MoeOps`]: the extension trait of mixture-of-experts ops (GPT-OSS, Qwen3-Next's MoE
//! layers), and the router's modes. Models reach it with [`Backend::moe`](crate::Backend::moe).

use crate::{Result, Tensor};

/// How a MoE router turns one token's logits `[E]` into k expert ids and weights. Both modes
/// choose the k largest logits, sorted descending, ties broken by the lower expert index (softmax
/// is monotonic, so these are also the k largest probabilities); they differ in the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterMode {
    /// GPT-OSS (docs/models.md §3.3): softmax over the k selected logits only.
    SoftmaxOfTopK,
    /// Qwen3-Next (docs/models.md §4.6): the selected experts' probabilities from a softmax over all
    /// E logits, divided by their sum when `norm_topk_prob`.
    TopKOfSoftmax { norm_topk_prob: bool },
}

/// Routing, expert row gather/scatter, MXFP4 weights and GPT-OSS's clamped SwiGLU. A backend
/// implements it when it runs MoE models and says so in
/// [`Backend::moe_ops`](crate::Backend::moe_ops).
pub trait MoeOps: Send + Sync {
    /// Router top-k of logits `[T, E]` (f32 activations; `1 <= k <= E`): expert ids `[T, k]`
    /// and their weights `[T, k]`, on the host (the engine decides from them which experts to
    /// load). See [`RouterMode`] for the order and the weights. The CUDA backend takes
    /// `E <= 1024`.
    fn router_topk(&self, logits: &Tensor, k: usize, mode: RouterMode) -> Result<(Vec<u32>, Vec<f32>)>;

    /// `out[i, :] = src[rows[i], :]`; src `[T, n]`, out `[rows.len(), n]`, f32 activations.
    fn gather_rows(&self, src: &Tensor, rows: &[u32], out: &mut Tensor) -> Result<()>;

    /// `dst[rows[i], :] += weights[i] · src[i, :]`; src `[rows.len(), n]`, dst `[T, n]`, f32
    /// activations; no row may appear twice (one expert sees a token once).
    fn scatter_add_rows(&self, src: &Tensor, rows: &[u32], weights: &[f32], dst: &mut Tensor) -> Result<()>;

    /// GPT-OSS clamped SwiGLU (docs/models.md §3.3): gate_up `[T, 2I]` holds gate in the even and
    /// up in the odd columns; `out[T, I] = (clamp(up, ±limit) + 1) ⊙ g ⊙ σ(alpha·g)` with
    /// `g = min(gate, limit)` (upper clamp only).
    fn clamped_swiglu(&self, gate_up: &Tensor, limit: f32, alpha: f32, out: &mut Tensor) -> Result<()>;

    /// MXFP4 to bf16, bit-exact (docs/models.md §3.4): blocks (U8, `rows·cols/2` bytes: byte j of a
    /// 32-element group holds element 2j in its low nibble, 2j+1 in its high one) and scales
    /// (U8, `rows·cols/32`, E8M0) into out `[rows, cols]` BF16 (from [`Memory::alloc`](crate::Memory::alloc)).
    fn dequant_mxfp4(&self, blocks: &Tensor, scales: &Tensor, out: &mut Tensor) -> Result<()>;

    /// `out = x · Wᵀ (+ bias)` with W `[n, k]` in MXFP4 as [`MoeOps::dequant_mxfp4`] takes it
    /// (`n` = blocks' first dimension), read packed: for a few rows of x (decode) this reads
    /// 4.25 bits a weight instead of unpacking to bf16 first. x `[T, k]`, out `[T, n]`.
    fn matmul_mxfp4(
        &self,
        x: &Tensor,
        blocks: &Tensor,
        scales: &Tensor,
        bias: Option<&Tensor>,
        out: &mut Tensor,
    ) -> Result<()>;
}
