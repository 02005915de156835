//! Launcher for `kernels/gemv.cu`: decode-shaped matmuls (a few rows of x) with bf16 or f16
//! weights read once from HBM.

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

use super::pdl::{self, Arg};
use super::{CudaDevice, CudaStorage, driver_err, shape};
use crate::Result;

/// The kernel file's source text.
pub const SOURCE: &str = include_str!("../../kernels/gemv.cu");

/// Rows of x up to which the GEMV kernel is used (its largest compiled entry).
pub const GEMV_MAX_T: usize = 8;

/// Weight element types the kernel has entries for.
pub trait GemvWeight: DeviceRepr {
    const NAME: &'static str;
}

impl GemvWeight for half::bf16 {
    const NAME: &'static str = "bf16";
}

impl GemvWeight for half::f16 {
    const NAME: &'static str = "f16";
}

/// Whether [`gemv`] covers x `[t, k]`: few rows, k a multiple of 8 (16-byte weight loads).
pub fn covers(t: usize, k: usize) -> bool {
    (1..=GEMV_MAX_T).contains(&t) && k > 0 && k.is_multiple_of(8)
}

/// `out = x · wᵀ`; x `[t, k]` f32, w `[n, k]`, out `[t, n]` f32, for shapes [`covers`] accepts.
pub fn gemv<W: GemvWeight>(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    w: &CudaSlice<W>,
    n: usize,
    k: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    launch_rows(dev, "gemv", (x, w), (n, k), out)
}

/// `out += x · wᵀ` (a residual add as the GEMV's epilogue); shapes as [`gemv`]'s. The product
/// is summed as [`gemv`] sums it, so the result equals `gemv` then `add_assign` bit for bit.
pub fn gemv_add<W: GemvWeight>(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    w: &CudaSlice<W>,
    n: usize,
    k: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    launch_rows(dev, "gemv_add", (x, w), (n, k), out)
}

/// Launches the `{entry}_{dtype}_t{T}` kernel of [`gemv`]'s arguments (`gemv` or `gemv_add`).
fn launch_rows<W: GemvWeight>(
    dev: &CudaDevice,
    entry: &'static str,
    (x, w): (&CudaSlice<f32>, &CudaSlice<W>),
    (n, k): (usize, usize),
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let t = x.len().checked_div(k).unwrap_or(0);
    if !covers(t, k) || x.len() != t * k || w.len() != n * k || out.len() != t * n || n == 0 {
        return Err(shape(entry, format!("x {}, w {} ([{n}, {k}]), out {}", x.len(), w.len(), out.len())));
    }
    let tt = [1, 2, 4, 8].into_iter().find(|&c| c >= t).unwrap_or(GEMV_MAX_T);
    let func = dev.function("gemv", SOURCE, &format!("{entry}_{}_t{tt}", W::NAME))?;
    let (t_i32, n_i32, k_i32) = (t as i32, n as i32, k as i32);
    let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    if dev.pdl() {
        let args =
            [Arg::buf(dev, x), Arg::buf(dev, w), Arg::buf(dev, out), Arg::I32(t_i32), Arg::I32(n_i32), Arg::I32(k_i32)];
        // SAFETY: as below; the kernel opens with pdl_sync (pdl.rs).
        return unsafe { pdl::launch(dev, &func, cfg, &args) };
    }
    let mut l = dev.stream.launch_builder(&func);
    l.arg(x).arg(w).arg(out).arg(&t_i32).arg(&n_i32).arg(&k_i32);
    // SAFETY: sizes checked above (k % 8 == 0 keeps every 16-byte load inside its row); one
    // block per output row, each output element read and written by one thread.
    unsafe { l.launch(cfg) }.map_err(driver_err(entry))?;
    Ok(())
}

/// `out = silu(x · gateᵀ) ⊙ (x · upᵀ)`; x `[t, k]`, gate and up `[n, k]`, out `[t, n]`: both
/// GEMVs in one launch, equal to `gemv`, `gemv`, `silu_mul` bit for bit.
pub fn gemv_swiglu<W: GemvWeight>(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    (gate, up): (&CudaSlice<W>, &CudaSlice<W>),
    n: usize,
    k: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let t = x.len().checked_div(k).unwrap_or(0);
    if !covers(t, k) || x.len() != t * k || gate.len() != n * k || up.len() != n * k || out.len() != t * n || n == 0 {
        return Err(shape(
            "cuda gemv_swiglu",
            format!("x {}, gate {}, up {} ([{n}, {k}]), out {}", x.len(), gate.len(), up.len(), out.len()),
        ));
    }
    let tt = [1, 2, 4, 8].into_iter().find(|&c| c >= t).unwrap_or(GEMV_MAX_T);
    let func = dev.function("gemv", SOURCE, &format!("gemv_swiglu_{}_t{tt}", W::NAME))?;
    let (t_i32, n_i32, k_i32) = (t as i32, n as i32, k as i32);
    let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    if dev.pdl() {
        let args = [
            Arg::buf(dev, x),
            Arg::buf(dev, gate),
            Arg::buf(dev, up),
            Arg::buf(dev, out),
            Arg::I32(t_i32),
            Arg::I32(n_i32),
            Arg::I32(k_i32),
        ];
        // SAFETY: as below; the kernel opens with pdl_sync (pdl.rs).
        return unsafe { pdl::launch(dev, &func, cfg, &args) };
    }
    let mut l = dev.stream.launch_builder(&func);
    l.arg(x).arg(gate).arg(up).arg(out).arg(&t_i32).arg(&n_i32).arg(&k_i32);
    // SAFETY: as in `gemv`, for both weight matrices (same shape, checked above).
    unsafe { l.launch(cfg) }.map_err(driver_err("gemv_swiglu"))?;
    Ok(())
}

/// The weights and outputs of [`gemv_norm_qkv`]: `(w, n, out)` for Q, K and V, w `[n, k]`,
/// out `[t, n]`.
pub type QkvOut<'a, W> = [(&'a CudaSlice<W>, usize, &'a mut CudaSlice<f32>); 3];

/// `q, k, v = RMSNorm(x) · wqᵀ, · wkᵀ, · wvᵀ` in one launch: x `[t, k]`, norm weight `[k]`
/// (bf16, f16 or f32), `offset` 1 for zero-centred norms. Each block recomputes the rows' rms as
/// `rmsnorm.rs` does, so the outputs equal `rms_norm` then three `gemv`s bit for bit.
pub fn gemv_norm_qkv<W: GemvWeight>(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    (nw, eps, offset): (&CudaStorage, f32, f32),
    k: usize,
    [(wq, nq, q), (wk, nk, ko), (wv, nv, vo)]: QkvOut<'_, W>,
) -> Result<()> {
    let t = x.len().checked_div(k).unwrap_or(0);
    let fits = |w: &CudaSlice<W>, n: usize, o: &CudaSlice<f32>| n > 0 && w.len() == n * k && o.len() == t * n;
    if !covers(t, k)
        || x.len() != t * k
        || nw.len() != k
        || matches!(nw, CudaStorage::U8(_))
        || !fits(wq, nq, q)
        || !fits(wk, nk, ko)
        || !fits(wv, nv, vo)
        || u32::try_from(nq + nk + nv).is_err()
    {
        return Err(shape(
            "cuda gemv_norm_qkv",
            format!("x {}, norm {}, q/k/v rows {nq}/{nk}/{nv} of {k}", x.len(), nw.len()),
        ));
    }
    let tt = if t == 1 { 1 } else { GEMV_MAX_T };
    let name = format!("gemv_norm_qkv_{}_{}w_t{tt}", W::NAME, nw.kernel_suffix());
    let func = dev.function("gemv", SOURCE, &name)?;
    let [t_i32, nq_i32, nk_i32, nv_i32, k_i32] = [t, nq, nk, nv, k].map(|v| v as i32);
    let blocks = (nq + nk + nv) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    if dev.pdl() {
        let mut args = vec![Arg::buf(dev, x), norm_arg(dev, nw), Arg::F32(eps), Arg::F32(offset)];
        args.extend([Arg::buf(dev, wq), Arg::buf(dev, wk), Arg::buf(dev, wv)]);
        args.extend([Arg::buf(dev, q), Arg::buf(dev, ko), Arg::buf(dev, vo)]);
        args.extend([t_i32, nq_i32, nk_i32, nv_i32, k_i32].map(Arg::I32));
        // SAFETY: as below; the kernel opens with pdl_sync (pdl.rs).
        return unsafe { pdl::launch(dev, &func, cfg, &args) };
    }
    let mut l = dev.stream.launch_builder(&func);
    l.arg(x);
    nw.push_arg(&mut l);
    l.arg(&eps).arg(&offset).arg(wq).arg(wk).arg(wv).arg(q).arg(ko).arg(vo);
    l.arg(&t_i32).arg(&nq_i32).arg(&nk_i32).arg(&nv_i32).arg(&k_i32);
    // SAFETY: sizes checked above (k % 8 == 0 keeps the 16-byte weight and norm loads inside
    // their rows); one block per output row of the three projections.
    unsafe { l.launch(cfg) }.map_err(driver_err("gemv_norm_qkv"))?;
    Ok(())
}

/// `out = silu(RMSNorm(x) · gateᵀ) ⊙ (RMSNorm(x) · upᵀ)` in one launch: [`gemv_swiglu`] with the
/// norm folded in as [`gemv_norm_qkv`] folds it; equal to `rms_norm`, `gemv`, `gemv`,
/// `silu_mul` bit for bit.
pub fn gemv_norm_swiglu<W: GemvWeight>(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    (nw, eps, offset): (&CudaStorage, f32, f32),
    (gate, up): (&CudaSlice<W>, &CudaSlice<W>),
    (n, k): (usize, usize),
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let t = x.len().checked_div(k).unwrap_or(0);
    if !covers(t, k)
        || x.len() != t * k
        || nw.len() != k
        || matches!(nw, CudaStorage::U8(_))
        || gate.len() != n * k
        || up.len() != n * k
        || out.len() != t * n
        || n == 0
        || u32::try_from(n).is_err()
    {
        return Err(shape(
            "cuda gemv_norm_swiglu",
            format!(
                "x {}, norm {}, gate {}, up {} ([{n}, {k}]), out {}",
                x.len(),
                nw.len(),
                gate.len(),
                up.len(),
                out.len()
            ),
        ));
    }
    let tt = if t == 1 { 1 } else { GEMV_MAX_T };
    let name = format!("gemv_norm_swiglu_{}_{}w_t{tt}", W::NAME, nw.kernel_suffix());
    let func = dev.function("gemv", SOURCE, &name)?;
    let [t_i32, n_i32, k_i32] = [t, n, k].map(|v| v as i32);
    let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    if dev.pdl() {
        let mut args = vec![Arg::buf(dev, x), norm_arg(dev, nw), Arg::F32(eps), Arg::F32(offset)];
        args.extend([Arg::buf(dev, gate), Arg::buf(dev, up), Arg::buf(dev, out)]);
        args.extend([t_i32, n_i32, k_i32].map(Arg::I32));
        // SAFETY: as below; the kernel opens with pdl_sync (pdl.rs).
        return unsafe { pdl::launch(dev, &func, cfg, &args) };
    }
    let mut l = dev.stream.launch_builder(&func);
    l.arg(x);
    nw.push_arg(&mut l);
    l.arg(&eps).arg(&offset).arg(gate).arg(up).arg(out).arg(&t_i32).arg(&n_i32).arg(&k_i32);
    // SAFETY: sizes checked above, as in `gemv_norm_qkv`; one block per output column.
    unsafe { l.launch(cfg) }.map_err(driver_err("gemv_norm_swiglu"))?;
    Ok(())
}

/// A norm weight's address as a raw launch argument.
fn norm_arg(dev: &CudaDevice, nw: &CudaStorage) -> Arg {
    match nw {
        CudaStorage::F32(b) => Arg::buf(dev, b),
        CudaStorage::F16(b) => Arg::buf(dev, b),
        CudaStorage::BF16(b) => Arg::buf(dev, b),
        CudaStorage::U8(b) => Arg::buf(dev, b),
    }
}
