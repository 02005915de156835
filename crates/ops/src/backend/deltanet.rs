//! [`DeltaNetOps`]: the extension trait of Gated DeltaNet ops (Qwen3-Next's linear-attention
//! layers), and the types its calls take. Models reach it with
//! [`Backend::deltanet`](crate::Backend::deltanet).

use crate::{Result, Tensor};

/// The inputs of one [`DeltaNetOps::delta_rule`] call.
#[derive(Clone, Copy, Debug)]
pub struct DeltaRule<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub g: &'a Tensor,
    pub beta: &'a Tensor,
}

/// How [`DeltaNetOps::delta_rule`] walks the steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaForm {
    /// One step after another (the definition; decode).
    Recurrent,
    /// Chunks of 64 steps in matrix form (prefill).
    Chunked,
}

/// Gates, the causal convolution, the delta rule and its norms. A backend implements it when it
/// runs Qwen3-Next and says so in [`Backend::deltanet_ops`](crate::Backend::deltanet_ops).
pub trait DeltaNetOps: Send + Sync {
    /// `x ← x · scale / sqrt(Σx² + eps)` over the last axis (Gated DeltaNet's q and k).
    fn l2_norm(&self, x: &mut Tensor, eps: f32, scale: f32) -> Result<()>;

    /// Gated DeltaNet's gates per value head: `g = −exp(a_log) · softplus(a + dt_bias)` and
    /// `beta = σ(b)`. a, b, g, beta `[T, nv]`; a_log, dt_bias `[nv]`.
    fn deltanet_gates(
        &self,
        a: &Tensor,
        b: &Tensor,
        a_log: &Tensor,
        dt_bias: &Tensor,
        g: &mut Tensor,
        beta: &mut Tensor,
    ) -> Result<()>;

    /// Causal depthwise convolution then SiLU over x `[T, C]` with w `[C, 1, K]` (or `[C, K]`):
    /// `out[t, c] = silu(Σ_j w[c, j] · u[t + j][c])` for `u = [state; x]`; `state` `[K − 1, C]`
    /// f32 holds the inputs before x and is replaced by the last K − 1.
    fn causal_conv1d(&self, x: &Tensor, w: &Tensor, state: &mut Tensor, out: &mut Tensor) -> Result<()>;

    /// The gated delta rule (docs/models.md §4.5) over T steps from `state` `[nv, dk, dv]` f32
    /// (updated): q, k `[T, nk, dk]` (L2-normalised, q scaled), v `[T, nv, dv]`, g and beta
    /// `[T, nv]`; out `[T, nv, dv]`. Value head n reads key head n / (nv / nk). Both forms give
    /// the same result up to rounding.
    fn delta_rule(&self, x: DeltaRule<'_>, state: &mut Tensor, out: &mut Tensor, form: DeltaForm) -> Result<()>;

    /// Qwen3-Next gated RMSNorm (docs/models.md §1.1, Gated-RMS): `out = w ⊙ r(x) ⊙ silu(z)` over the
    /// last axis, `r(x) = x · rsqrt(mean(x²) + eps)`; x, z, out `[.., n]`, plain weight w `[n]`.
    fn gated_rms_norm(&self, x: &Tensor, z: &Tensor, w: &Tensor, eps: f32, out: &mut Tensor) -> Result<()>;
}
