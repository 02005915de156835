//! [`FusedOps`]: op sequences of a decode step that a device backend may run as one kernel.
//! Each method's default is the plain ops composed: the CPU backend's form, and the twin every
//! fused kernel is checked against (tests/parity_cuda_vs_cpu.rs). A backend overrides the
//! shapes it fuses and calls the composed form ([`matmul_add_composed`],
//! [`matmul_swiglu_composed`], [`norm_qkv_composed`], [`norm_swiglu_composed`], [`rope_write_kv_composed`]) for the
//! rest.

use crate::{Compute, NormKind, Result, RopeTable, Tensor};

/// A weight `[out, in]` and its optional bias `[out]`.
pub type Linear<'a> = (&'a Tensor, Option<&'a Tensor>);

/// An RMSNorm's weight, epsilon and kind.
pub type Norm<'a> = (&'a Tensor, f32, NormKind);

/// `normed = RMSNorm(x)`, then `q, k, v = normed · wᵀ (+ bias)` for the three projections, as
/// `rms_norm` and three `matmul`s.
pub fn norm_qkv_composed<C: Compute + ?Sized>(
    be: &C,
    x: &Tensor,
    (nw, eps, kind): Norm<'_>,
    [wq, wk, wv]: [Linear<'_>; 3],
    normed: &mut Tensor,
    [q, k, v]: [&mut Tensor; 3],
) -> Result<()> {
    be.rms_norm(x, nw, eps, kind, normed)?;
    // One call for the three (the CPU runs them in one parallel region; each output equals its
    // own matmul).
    be.matmul_many(normed, &[wq, wk, wv], &mut [q, k, v])
}

/// `normed = RMSNorm(x)`, then [`matmul_swiglu_composed`] on it.
pub fn norm_swiglu_composed<C: Compute + ?Sized>(
    be: &C,
    x: &Tensor,
    (nw, eps, kind): Norm<'_>,
    weights: (Linear<'_>, Linear<'_>),
    (normed, g, u): (&mut Tensor, &mut Tensor, &mut Tensor),
    out: &mut Tensor,
) -> Result<()> {
    be.rms_norm(x, nw, eps, kind, normed)?;
    matmul_swiglu_composed(be, normed, weights, (g, u), out)
}

/// `rope(q)`, `rope(k)` at positions `pos0..`, then `write_kv` of k and v into the caches at
/// row `row0`.
pub fn rope_write_kv_composed<C: Compute + ?Sized>(
    be: &C,
    (q, k, v): (&mut Tensor, &mut Tensor, &Tensor),
    (table, pos0): (&RopeTable, usize),
    (kc, vc): (&mut Tensor, &mut Tensor),
    row0: usize,
) -> Result<()> {
    be.rope(q, table, pos0)?;
    be.rope(k, table, pos0)?;
    be.write_kv(kc, k, row0)?;
    be.write_kv(vc, v, row0)
}

/// `acc += x · wᵀ (+ bias)` as `matmul` into `tmp`, then `add_assign`.
pub fn matmul_add_composed<C: Compute + ?Sized>(
    be: &C,
    x: &Tensor,
    (w, bias): (&Tensor, Option<&Tensor>),
    tmp: &mut Tensor,
    acc: &mut Tensor,
) -> Result<()> {
    be.matmul(x, w, bias, tmp)?;
    be.add_assign(acc, tmp)
}

/// `out = silu(x · gateᵀ (+ bg)) ⊙ (x · upᵀ (+ bu))` as one `matmul_many` into `g`, `u`, then
/// `silu_mul`.
pub fn matmul_swiglu_composed<C: Compute + ?Sized>(
    be: &C,
    x: &Tensor,
    (gate, up): (Linear<'_>, Linear<'_>),
    (g, u): (&mut Tensor, &mut Tensor),
    out: &mut Tensor,
) -> Result<()> {
    be.matmul_many(x, &[gate, up], &mut [g, u])?;
    be.silu_mul(g, u, out)
}

/// Fused forms of a decode step's op sequences (issue 27: fewer launches per layer). Shapes as
/// the ops they stand for; the scratch arguments hold the intermediate products where the
/// sequence runs composed (a fused kernel may leave them untouched).
pub trait FusedOps: Compute {
    /// `acc += x · wᵀ (+ bias)`: the residual add as the matmul's epilogue. x `[T, in]`,
    /// w `[out, in]`, tmp and acc `[T, out]`.
    fn matmul_add(&self, x: &Tensor, w: (&Tensor, Option<&Tensor>), tmp: &mut Tensor, acc: &mut Tensor) -> Result<()> {
        matmul_add_composed(self, x, w, tmp, acc)
    }

    /// `out = silu(x · gateᵀ (+ bg)) ⊙ (x · upᵀ (+ bu))`, the gated MLP's first half. x
    /// `[T, H]`, gate and up `[I, H]`, g, u and out `[T, I]`.
    fn matmul_swiglu(
        &self,
        x: &Tensor,
        weights: (Linear<'_>, Linear<'_>),
        scratch: (&mut Tensor, &mut Tensor),
        out: &mut Tensor,
    ) -> Result<()> {
        matmul_swiglu_composed(self, x, weights, scratch, out)
    }

    /// `q, k, v = RMSNorm(x) · w{q,k,v}ᵀ (+ bias)`: the attention block's norm and projections
    /// in one launch. x `[T, H]`, q `[T, nq]`, k `[T, nk]`, v `[T, nv]` (head axes may follow);
    /// `normed` `[T, H]` holds the norm where the sequence runs composed.
    fn norm_matmul_qkv(
        &self,
        x: &Tensor,
        norm: Norm<'_>,
        weights: [Linear<'_>; 3],
        normed: &mut Tensor,
        out: [&mut Tensor; 3],
    ) -> Result<()> {
        norm_qkv_composed(self, x, norm, weights, normed, out)
    }

    /// `out = silu(RMSNorm(x) · gateᵀ) ⊙ (RMSNorm(x) · upᵀ)`: the MLP's norm and first half in
    /// one launch. x `[T, H]`; scratch `normed` `[T, H]`, g and u `[T, I]`; out `[T, I]`.
    fn norm_matmul_swiglu(
        &self,
        x: &Tensor,
        norm: Norm<'_>,
        weights: (Linear<'_>, Linear<'_>),
        scratch: (&mut Tensor, &mut Tensor, &mut Tensor),
        out: &mut Tensor,
    ) -> Result<()> {
        norm_swiglu_composed(self, x, norm, weights, scratch, out)
    }

    /// Rotates q `[T, nh, d]` and k `[T, nkv, d]` in place at positions `pos0..pos0 + T` and
    /// writes k and v `[T, nkv, d]` into the caches `[nkv, cap, d]` at rows `row0..`: RoPE and
    /// the KV append in one launch.
    fn rope_write_kv(
        &self,
        qkv: (&mut Tensor, &mut Tensor, &Tensor),
        rope: (&RopeTable, usize),
        caches: (&mut Tensor, &mut Tensor),
        row0: usize,
    ) -> Result<()> {
        rope_write_kv_composed(self, qkv, rope, caches, row0)
    }
}

/// The CPU backend runs every sequence composed (it is the reference).
impl FusedOps for crate::cpu::CpuBackend {}
