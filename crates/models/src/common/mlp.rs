//! The gated MLP (docs/models.md §1.4): `down(silu(gate(x)) ⊙ up(x))`.

use ollm_ops::{Backend, Tensor};

use crate::Result;

/// Weights of one gated MLP (`[I, H]`, `[I, H]`, `[H, I]`), optional biases.
#[derive(Debug)]
pub struct MlpWeights {
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
    pub gate_bias: Option<Tensor>,
    pub up_bias: Option<Tensor>,
    pub down_bias: Option<Tensor>,
}

/// Activations of one MLP call for T tokens.
#[derive(Debug)]
pub struct MlpScratch {
    /// `[T, I]` each
    pub gate: Tensor,
    pub up: Tensor,
    pub act: Tensor,
    /// `[T, H]`
    pub out: Tensor,
}

impl MlpScratch {
    /// Shapes of gate, up, act and out.
    pub fn shapes(t: usize, hidden: usize, inter: usize) -> Vec<Vec<usize>> {
        vec![vec![t, inter], vec![t, inter], vec![t, inter], vec![t, hidden]]
    }

    pub fn new(backend: &dyn Backend, t: usize, hidden: usize, inter: usize) -> Result<Self> {
        let [gate, up, act, out] = crate::common::forward::alloc_all(backend, Self::shapes(t, hidden, inter))?
            .try_into()
            .map_err(|_| ollm_ops::OpsError::Backend("internal: MLP scratch".into()))?;
        Ok(Self { gate, up, act, out })
    }
}

/// `s.act = silu(gate(x)) ⊙ up(x)`, one launch where the backend fuses it.
fn swiglu(backend: &dyn Backend, w: &MlpWeights, x: &Tensor, s: &mut MlpScratch) -> Result<()> {
    let weights = ((&w.gate, w.gate_bias.as_ref()), (&w.up, w.up_bias.as_ref()));
    backend.matmul_swiglu(x, weights, (&mut s.gate, &mut s.up), &mut s.act)?;
    Ok(())
}

/// `s.out = MLP(x)`, x `[T, H]`.
pub fn gated_mlp(backend: &dyn Backend, w: &MlpWeights, x: &Tensor, s: &mut MlpScratch) -> Result<()> {
    swiglu(backend, w, x, s)?;
    backend.matmul(&s.act, &w.down, w.down_bias.as_ref(), &mut s.out)?;
    Ok(())
}

/// `x += MLP(RMSNorm(x))`, x `[T, H]`: the norm folded into the gate/up launch and the add into
/// the down projection's where the backend fuses them (the same ops in the same order as
/// `rms_norm`, [`gated_mlp`] and `add_assign`); `normed` `[T, H]` is scratch.
pub fn norm_gated_mlp_add(
    backend: &dyn Backend,
    w: &MlpWeights,
    norm: ollm_ops::backend::Norm<'_>,
    (normed, s): (&mut Tensor, &mut MlpScratch),
    x: &mut Tensor,
) -> Result<()> {
    let weights = ((&w.gate, w.gate_bias.as_ref()), (&w.up, w.up_bias.as_ref()));
    backend.norm_matmul_swiglu(x, norm, weights, (normed, &mut s.gate, &mut s.up), &mut s.act)?;
    backend.matmul_add(&s.act, (&w.down, w.down_bias.as_ref()), &mut s.out, x)?;
    Ok(())
}
