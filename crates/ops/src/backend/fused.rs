//! [`FusedOps`]: op sequences of a decode step that a device backend may run as one kernel.
//! Each method's default is the plain ops composed: the CPU backend's form, and the twin every
//! fused kernel is checked against (tests/parity_cuda_vs_cpu.rs). A backend overrides the
//! shapes it fuses and calls the composed form ([`matmul_add_composed`],
//! [`matmul_swiglu_composed`]) for the rest.

use crate::{Compute, Result, Tensor};

/// A weight `[out, in]` and its optional bias `[out]`.
pub type Linear<'a> = (&'a Tensor, Option<&'a Tensor>);

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

/// `out = silu(x · gateᵀ (+ bg)) ⊙ (x · upᵀ (+ bu))` as two `matmul`s into `g`, `u`, then
/// `silu_mul`.
pub fn matmul_swiglu_composed<C: Compute + ?Sized>(
    be: &C,
    x: &Tensor,
    (gate, up): (Linear<'_>, Linear<'_>),
    (g, u): (&mut Tensor, &mut Tensor),
    out: &mut Tensor,
) -> Result<()> {
    be.matmul(x, gate.0, gate.1, g)?;
    be.matmul(x, up.0, up.1, u)?;
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
}

/// The CPU backend runs every sequence composed (it is the reference).
impl FusedOps for crate::cpu::CpuBackend {}
