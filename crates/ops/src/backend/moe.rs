//! [`MoeOps`]: the extension trait of mixture-of-experts ops (GPT-OSS, Qwen3-Next's MoE
//! layers), and the router's modes. Models reach it with [`Backend::moe`](crate::Backend::moe).

use crate::{Backend, OpsError, Result, Tensor};

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

    /// The experts of one MoE layer over their routed rows in a few launches (prefill): for each
    /// expert in the given order, `acc[rows[i]] += weights[i] · FFN_e(x[rows[i]])` (see
    /// [`RoutedExpert`] and [`ExpertAct`]); x and acc `[T, H]` f32. `Ok(false)` when this backend
    /// has no grouped kernel for these experts (then nothing was done and the caller runs
    /// [`experts_by_expert`], the per-expert loop this must match).
    fn grouped_experts(
        &self,
        x: &Tensor,
        experts: &[RoutedExpert<'_>],
        act: ExpertAct,
        acc: &mut Tensor,
    ) -> Result<bool> {
        let _ = (x, experts, act, acc);
        Ok(false)
    }

    /// Whether a model hands a prompt's experts to [`run_experts`] in groups, as stored (MXFP4
    /// packed), rather than one at a time unpacked: where [`MoeOps::grouped_experts`] has
    /// kernels, or where the per-expert loop gives the same numbers either way (the CPU).
    fn has_grouped_experts(&self) -> bool {
        false
    }
}

/// Routes (token, expert pairs) one grouped launch covers at most; bounds its scratch
/// ([`grouped_scratch_bytes`]).
pub const GROUPED_PIECE_ROUTES: usize = 4096;

/// Device bytes [`MoeOps::grouped_experts`] allocates for one call (bf16 activations and f32
/// outputs of one piece of routes), for hidden size `h` and expert width `i`.
pub fn grouped_scratch_bytes(h: usize, i: usize) -> u64 {
    (GROUPED_PIECE_ROUTES * (2 * i + 4 * h)) as u64
}

/// One expert matrix in nn.Linear layout `[out, in]`: dense (any float dtype) or MXFP4 blocks
/// and scales as [`MoeOps::dequant_mxfp4`] takes them.
#[derive(Debug, Clone, Copy)]
pub enum ExpertMatrixRef<'a> {
    Dense(&'a Tensor),
    Mxfp4 { blocks: &'a Tensor, scales: &'a Tensor },
}

impl ExpertMatrixRef<'_> {
    /// `out = x · Wᵀ (+ bias)`.
    pub fn matmul(&self, be: &dyn Backend, x: &Tensor, bias: Option<&Tensor>, out: &mut Tensor) -> Result<()> {
        match *self {
            ExpertMatrixRef::Dense(w) => be.matmul(x, w, bias, out),
            ExpertMatrixRef::Mxfp4 { blocks, scales } => be.moe()?.matmul_mxfp4(x, blocks, scales, bias, out),
        }
    }

    /// Output rows (the first dimension of the weight or of the blocks).
    pub fn rows(&self) -> usize {
        match self {
            ExpertMatrixRef::Dense(w) => w.shape().first().copied().unwrap_or(0),
            ExpertMatrixRef::Mxfp4 { blocks, .. } => blocks.shape().first().copied().unwrap_or(0),
        }
    }
}

/// One expert of a layer and the rows routed to it.
#[derive(Debug, Clone, Copy)]
pub struct RoutedExpert<'a> {
    /// `[2I, H]` with gate and up rows interleaved (GPT-OSS, `up` None), or the gate `[I, H]`
    /// alone when `up` is given (Qwen3-Next).
    pub gate_up: ExpertMatrixRef<'a>,
    pub up: Option<ExpertMatrixRef<'a>>,
    /// `[H, I]`
    pub down: ExpertMatrixRef<'a>,
    /// `[2I]` (interleaved like gate_up's rows) and `[H]`.
    pub gate_up_bias: Option<&'a Tensor>,
    pub down_bias: Option<&'a Tensor>,
    /// Rows of x (distinct) and their router weights.
    pub rows: &'a [u32],
    pub weights: &'a [f32],
}

/// The activation between an expert's two projections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExpertAct {
    /// GPT-OSS: [`MoeOps::clamped_swiglu`] of the interleaved gate_up (`up` None).
    ClampedSwiglu { limit: f32, alpha: f32 },
    /// Qwen3-Next: `silu(gate) ⊙ up` ([`Compute::silu_mul`](crate::Compute::silu_mul)), gate
    /// and up separate matrices.
    SiluMul,
}

/// The per-expert loop [`MoeOps::grouped_experts`] must match (its CPU twin, and what a backend
/// without grouped kernels runs): for each expert in order, gather its rows of x, the two
/// projections with the activation between, then `acc[rows] += weights · y`, at most
/// `max_rows` rows a call.
pub fn experts_by_expert(
    be: &dyn Backend,
    x: &Tensor,
    experts: &[RoutedExpert<'_>],
    act: ExpertAct,
    acc: &mut Tensor,
    max_rows: usize,
) -> Result<()> {
    let moe = be.moe()?;
    let h = x.shape().last().copied().unwrap_or(0);
    for e in experts {
        if e.rows.len() != e.weights.len() {
            return Err(OpsError::Shape {
                op: "grouped_experts",
                detail: format!("{} rows with {} weights", e.rows.len(), e.weights.len()),
            });
        }
        let inter = e.down_width()?;
        for (rows, weights) in e.rows.chunks(max_rows.max(1)).zip(e.weights.chunks(max_rows.max(1))) {
            let n = rows.len();
            let mut xs = be.zeros(vec![n, h])?;
            moe.gather_rows(x, rows, &mut xs)?;
            let mut a = be.zeros(vec![n, inter])?;
            match (act, e.up) {
                (ExpertAct::ClampedSwiglu { limit, alpha }, None) => {
                    let mut gu = be.zeros(vec![n, 2 * inter])?;
                    e.gate_up.matmul(be, &xs, e.gate_up_bias, &mut gu)?;
                    moe.clamped_swiglu(&gu, limit, alpha, &mut a)?;
                }
                (ExpertAct::SiluMul, Some(up)) => {
                    let (mut g, mut u) = (be.zeros(vec![n, inter])?, be.zeros(vec![n, inter])?);
                    e.gate_up.matmul(be, &xs, None, &mut g)?;
                    up.matmul(be, &xs, None, &mut u)?;
                    be.silu_mul(&g, &u, &mut a)?;
                }
                _ => return Err(act_mismatch(act)),
            }
            let mut y = be.zeros(vec![n, h])?;
            e.down.matmul(be, &a, e.down_bias, &mut y)?;
            moe.scatter_add_rows(&y, rows, weights, acc)?;
        }
    }
    Ok(())
}

impl RoutedExpert<'_> {
    /// The expert width I: the down matrix's input size.
    pub fn down_width(&self) -> Result<usize> {
        let h = self.down.rows();
        let inter = match self.down {
            ExpertMatrixRef::Dense(w) => w.shape().get(1).copied().unwrap_or(0),
            ExpertMatrixRef::Mxfp4 { scales, .. } => scales.numel().checked_div(h).unwrap_or(0) * 32,
        };
        if inter == 0 {
            return Err(OpsError::Shape { op: "grouped_experts", detail: format!("down matrix of {h} rows is empty") });
        }
        Ok(inter)
    }
}

fn act_mismatch(act: ExpertAct) -> OpsError {
    OpsError::Shape {
        op: "grouped_experts",
        detail: format!("{act:?} needs {} up matrix", if act == ExpertAct::SiluMul { "a separate" } else { "no" }),
    }
}

/// [`MoeOps::grouped_experts`] where the backend has it, else [`experts_by_expert`].
pub fn run_experts(
    be: &dyn Backend,
    x: &Tensor,
    experts: &[RoutedExpert<'_>],
    act: ExpertAct,
    acc: &mut Tensor,
    max_rows: usize,
) -> Result<()> {
    if be.moe()?.grouped_experts(x, experts, act, acc)? {
        return Ok(());
    }
    experts_by_expert(be, x, experts, act, acc, max_rows)
}
