//! Launchers for `kernels/deltanet.cu`: Qwen3-Next's Gated DeltaNet pieces, f32.

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{CudaDevice, driver_err, grid_stride, shape};
use crate::{DeltaForm, HeadSlice, Result};

/// The kernel file's source text.
pub const SOURCE: &str = include_str!("../../kernels/deltanet.cu");

/// Widest short convolution the kernel keeps in registers.
pub const MAX_CONV_KERNEL: usize = 8;

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| shape("cuda deltanet", format!("{what} = {v} does not fit the kernels' 32-bit sizes")))
}

/// See [`crate::Compute::slice_heads`]; sizes checked by the caller (`rows` rows).
pub fn slice_heads(
    dev: &CudaDevice,
    src: &CudaSlice<f32>,
    s: HeadSlice,
    rows: usize,
    out_cols: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let total = rows * s.heads * s.width;
    if total == 0 {
        return Ok(());
    }
    let func = dev.function("deltanet", SOURCE, "slice_heads_f32")?;
    let ints = [s.heads, s.stride, s.offset, s.width, out_cols, s.out_offset]
        .iter()
        .map(|&v| i32_of(v, "a slice size"))
        .collect::<Result<Vec<i32>>>()?;
    let rows_i64 = rows as i64;
    let mut l = dev.stream.launch_builder(&func);
    l.arg(src).arg(out).arg(&rows_i64);
    for v in &ints {
        l.arg(v);
    }
    // SAFETY: slice_dims checked src ([rows, heads·stride]) and out ([rows, out_cols]) against
    // the slice; the kernel touches only those elements.
    unsafe { l.launch(grid_stride(total)) }.map_err(driver_err("slice_heads"))?;
    Ok(())
}

/// `x ← x · scale / sqrt(Σx² + eps)` over rows of `d`.
pub fn l2_norm(dev: &CudaDevice, x: &mut CudaSlice<f32>, d: usize, eps: f32, scale: f32) -> Result<()> {
    if d == 0 || !x.len().is_multiple_of(d) {
        return Err(shape("cuda l2_norm", format!("{} elements in rows of {d}", x.len())));
    }
    let rows = x.len() / d;
    if rows == 0 {
        return Ok(());
    }
    let func = dev.function("deltanet", SOURCE, "l2_norm_f32")?;
    let d_i32 = i32_of(d, "the row length")?;
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    let mut l = dev.stream.launch_builder(&func);
    l.arg(x).arg(&d_i32).arg(&eps).arg(&scale);
    // SAFETY: one block of 128 threads (4 warps, as the kernel's reduction assumes) per row of d.
    unsafe { l.launch(cfg) }.map_err(driver_err("l2_norm"))?;
    Ok(())
}

/// `x ← x ⊙ σ(gate)`, one gate per `per` elements (1: elementwise).
pub fn sigmoid_mul(dev: &CudaDevice, x: &mut CudaSlice<f32>, gate: &CudaSlice<f32>, per: usize) -> Result<()> {
    if per == 0 || x.len() != gate.len() * per {
        return Err(shape("cuda sigmoid_mul", format!("x {}, gate {}, {per} per gate", x.len(), gate.len())));
    }
    if x.is_empty() {
        return Ok(());
    }
    let func = dev.function("deltanet", SOURCE, "sigmoid_mul_f32")?;
    let (n, per_i32) = (x.len() as i64, i32_of(per, "the gate's span")?);
    let cfg = grid_stride(x.len());
    let mut l = dev.stream.launch_builder(&func);
    l.arg(x).arg(gate).arg(&n).arg(&per_i32);
    // SAFETY: x has gate.len()·per elements (checked above).
    unsafe { l.launch(cfg) }.map_err(driver_err("sigmoid_mul"))?;
    Ok(())
}

/// The gates (see [`crate::DeltaNetOps::deltanet_gates`]); a_log and dt_bias f32 `[nv]`.
pub fn gates(
    dev: &CudaDevice,
    (a, b): (&CudaSlice<f32>, &CudaSlice<f32>),
    (a_log, dt_bias): (&CudaSlice<f32>, &CudaSlice<f32>),
    g: &mut CudaSlice<f32>,
    beta: &mut CudaSlice<f32>,
) -> Result<()> {
    let nv = a_log.len();
    let n = a.len();
    if nv == 0 || dt_bias.len() != nv || !n.is_multiple_of(nv) || b.len() != n || g.len() != n || beta.len() != n {
        return Err(shape(
            "cuda deltanet_gates",
            format!("a {n}, b {}, a_log {nv}, dt_bias {}", b.len(), dt_bias.len()),
        ));
    }
    if n == 0 {
        return Ok(());
    }
    let func = dev.function("deltanet", SOURCE, "deltanet_gates_f32")?;
    let (n_i64, nv_i32) = (n as i64, i32_of(nv, "value heads")?);
    let mut l = dev.stream.launch_builder(&func);
    l.arg(a).arg(b).arg(a_log).arg(dt_bias).arg(g).arg(&mut *beta).arg(&n_i64).arg(&nv_i32);
    // SAFETY: every buffer holds n (or nv) elements, checked above.
    unsafe { l.launch(grid_stride(n)) }.map_err(driver_err("deltanet_gates"))?;
    Ok(())
}

/// The short convolution (see [`crate::DeltaNetOps::causal_conv1d`]); w f32 `[C, K]`.
pub fn causal_conv1d(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    k: usize,
    state: &mut CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let c = w.len().checked_div(k).unwrap_or(0);
    if c == 0
        || !(1..=MAX_CONV_KERNEL).contains(&k)
        || !x.len().is_multiple_of(c)
        || out.len() != x.len()
        || state.len() != (k - 1) * c
    {
        return Err(shape(
            "cuda causal_conv1d",
            format!(
                "x {}, w {} (kernel {k}, at most {MAX_CONV_KERNEL}), state {}, out {}",
                x.len(),
                w.len(),
                state.len(),
                out.len()
            ),
        ));
    }
    let t = x.len() / c;
    let func = dev.function("deltanet", SOURCE, "causal_conv1d_f32")?;
    let (t_i32, c_i32, k_i32) = (i32_of(t, "rows")?, i32_of(c, "channels")?, k as i32);
    let cfg = LaunchConfig { grid_dim: (c.div_ceil(128) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    let mut l = dev.stream.launch_builder(&func);
    l.arg(x).arg(w).arg(state).arg(out).arg(&t_i32).arg(&c_i32).arg(&k_i32);
    // SAFETY: one thread per channel; sizes checked above (k ≤ 8 fits the kernel's registers).
    unsafe { l.launch(cfg) }.map_err(driver_err("causal_conv1d"))?;
    Ok(())
}

/// Slices of one delta-rule call on the device.
pub struct DeltaSlices<'a> {
    pub q: &'a CudaSlice<f32>,
    pub k: &'a CudaSlice<f32>,
    pub v: &'a CudaSlice<f32>,
    pub g: &'a CudaSlice<f32>,
    pub beta: &'a CudaSlice<f32>,
}

/// Steps per chunk and state columns per block of the chunked kernel (`DR_C`, `DR_W`).
const CHUNK: usize = 64;
const CHUNK_COLS: usize = 32;
/// The shared memory one block may opt into on sm_90 (227 KiB).
const MAX_SMEM: usize = 227 * 1024;

/// The delta rule, `(t, nk, dk, nv, dv)` checked by the caller: the chunked kernel for
/// [`DeltaForm::Chunked`] (when a chunk's matrices fit in shared memory), else step by step.
pub fn delta_rule(
    dev: &CudaDevice,
    x: DeltaSlices<'_>,
    (t, nk, dk, nv, dv): (usize, usize, usize, usize, usize),
    state: &mut CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    form: DeltaForm,
) -> Result<()> {
    if t == 0 {
        return Ok(());
    }
    let chunked_smem = (dk * CHUNK_COLS + 3 * CHUNK * (dk + 1) + CHUNK * CHUNK_COLS + CHUNK * CHUNK + 2 * CHUNK) * 4;
    let (name, smem, grid, threads) = if form == DeltaForm::Chunked && chunked_smem <= MAX_SMEM {
        ("delta_rule_chunked_f32", chunked_smem, (nv as u32, dv.div_ceil(CHUNK_COLS) as u32, 1), 256)
    } else {
        if dv > 1024 {
            return Err(shape("cuda delta_rule", format!("value head dim {dv} above 1024 threads")));
        }
        ("delta_rule_recurrent_f32", (dk * dv + 2 * dk) * 4, (nv as u32, 1, 1), dv.next_multiple_of(32) as u32)
    };
    let func = dev.function("deltanet", SOURCE, name)?;
    func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
        .map_err(driver_err("delta_rule shared memory"))?;
    let cfg = LaunchConfig { grid_dim: grid, block_dim: (threads, 1, 1), shared_mem_bytes: smem as u32 };
    let ints = [t, nk, dk, nv, dv].iter().map(|&v| i32_of(v, "a delta-rule size")).collect::<Result<Vec<i32>>>()?;
    let mut l = dev.stream.launch_builder(&func);
    l.arg(x.q).arg(x.k).arg(x.v).arg(x.g).arg(x.beta).arg(state).arg(out);
    for v in &ints {
        l.arg(v);
    }
    // SAFETY: shapes checked by delta_dims. Step by step: one block per value head with ≥ dv
    // threads and dk·dv + 2·dk floats of shared memory. Chunked: one block per value head and
    // 32 state columns (guarded against dv), with the shared memory its layout comment counts.
    // Either limit is raised above.
    unsafe { l.launch(cfg) }.map_err(driver_err("delta_rule"))?;
    Ok(())
}
