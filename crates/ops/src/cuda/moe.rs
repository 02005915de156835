//! Launchers for `kernels/moe.cu`: the GPT-OSS clamped SwiGLU, the router top-k, MXFP4
//! dequantisation, the transpose of dense experts, and the row gather/scatter of grouped experts.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use half::bf16;

use super::{CudaDevice, CudaStorage, driver_err, grid_stride, shape};
use crate::{Result, RouterMode};

/// The kernel file's source text.
pub const SOURCE: &str = include_str!("../../kernels/moe.cu");

/// The most experts [`router_topk`] takes: a lane's chosen experts fit one 32-bit mask.
pub const ROUTER_MAX_EXPERTS: usize = 1024;

/// Tokens (warps) per router block.
const ROUTER_WARPS: usize = 4;

/// `out [rows, I] = (clamp(up, ±limit) + 1) ⊙ g ⊙ σ(alpha·g)`, `g = min(gate, limit)`, from
/// gate_up `[rows, 2I]` (gate = even columns, up = odd), all f32 on the device; `inter` = I.
pub fn clamped_swiglu(
    dev: &CudaDevice,
    gate_up: &CudaSlice<f32>,
    inter: usize,
    limit: f32,
    alpha: f32,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    if inter == 0 || !out.len().is_multiple_of(inter) || gate_up.len() != 2 * out.len() {
        return Err(shape("cuda clamped_swiglu", format!("gate_up {}, out {}, I = {inter}", gate_up.len(), out.len())));
    }
    if out.is_empty() {
        return Ok(());
    }
    let func = dev.function("moe", SOURCE, "clamped_swiglu_f32")?;
    let total = out.len() as i64;
    let cfg = grid_stride(out.len());
    let mut l = dev.stream.launch_builder(&func);
    l.arg(gate_up).arg(out).arg(&total).arg(&limit).arg(&alpha);
    // SAFETY: matches clamped_swiglu_f32; out holds `total` elements and gate_up twice that.
    unsafe { l.launch(cfg) }.map_err(driver_err("clamped_swiglu"))?;
    Ok(())
}

/// Router top-k of logits `[t, e]` f32 on the device (`1 <= k <= e <= 1024`): writes
/// `out[..t·k]` = weights `[t, k]` and `out[t·k..2·t·k]` = expert ids `[t, k]` as exact floats
/// (read them back with [`unpack_router_output`]). `out` may be longer (a reused scratch); the
/// rest is left as it was. Same choice and order of operations as `cpu::router_topk`.
pub fn router_topk(
    dev: &CudaDevice,
    logits: &CudaSlice<f32>,
    e: usize,
    k: usize,
    mode: RouterMode,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    if e == 0 || e > ROUTER_MAX_EXPERTS || k == 0 || k > e || !logits.len().is_multiple_of(e) {
        return Err(shape(
            "cuda router_topk",
            format!("logits {} elements, E = {e} (at most {ROUTER_MAX_EXPERTS}), k = {k} (1 <= k <= E)", logits.len()),
        ));
    }
    let t = logits.len() / e;
    if out.len() < 2 * t * k || i32::try_from(2 * t * k).is_err() {
        return Err(shape("cuda router_topk", format!("out {} elements for [2, {t}, {k}]", out.len())));
    }
    if t == 0 {
        return Ok(());
    }
    let func = dev.function("moe", SOURCE, "router_topk_f32")?;
    let mode_i32: i32 = match mode {
        RouterMode::SoftmaxOfTopK => 0,
        RouterMode::TopKOfSoftmax { norm_topk_prob: false } => 1,
        RouterMode::TopKOfSoftmax { norm_topk_prob: true } => 2,
    };
    let (t_i32, e_i32, k_i32) = (t as i32, e as i32, k as i32);
    let cfg = LaunchConfig {
        grid_dim: (t.div_ceil(ROUTER_WARPS) as u32, 1, 1),
        block_dim: (32 * ROUTER_WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = dev.stream.launch_builder(&func);
    l.arg(logits).arg(out).arg(&t_i32).arg(&e_i32).arg(&k_i32).arg(&mode_i32);
    // SAFETY: matches router_topk_f32; logits hold t·e elements, out at least 2·t·k; k <= e, so
    // every round finds an expert and every index read is < e.
    unsafe { l.launch(cfg) }.map_err(driver_err("router_topk"))?;
    Ok(())
}

/// Splits a router output read back from the device (`[2, n]` with n = t·k: weights, then ids
/// as floats) into (ids, weights). An id that is not a whole number in `0..2²⁴` (an unwritten
/// or corrupted output) is an error, not a wrong expert.
pub fn unpack_router_output(host: &[f32], n: usize) -> Result<(Vec<u32>, Vec<f32>)> {
    if host.len() < 2 * n {
        return Err(shape("cuda router_topk", format!("read back {} elements for 2 × {n}", host.len())));
    }
    let ids = host[n..2 * n]
        .iter()
        .map(|&v| {
            if v >= 0.0 && v < (1u32 << 24) as f32 && v.fract() == 0.0 {
                Ok(v as u32)
            } else {
                Err(crate::OpsError::Backend(format!("cuda router_topk: the kernel wrote expert id {v}")))
            }
        })
        .collect::<Result<Vec<u32>>>()?;
    Ok((ids, host[..n].to_vec()))
}

/// MXFP4 to bf16 on the device, bit-exact with `mxfp4::dequantize`: `groups = rows·cols/32`
/// groups of 16 block bytes and one scale each, into `out` (`groups · 32` bf16).
pub fn dequant_mxfp4(
    dev: &CudaDevice,
    blocks: &CudaSlice<u8>,
    scales: &CudaSlice<u8>,
    out: &mut CudaSlice<bf16>,
) -> Result<()> {
    let groups = scales.len();
    if blocks.len() != groups * 16 || out.len() != groups * 32 {
        return Err(shape(
            "cuda dequant_mxfp4",
            format!("{} block bytes, {groups} scales, {} outputs", blocks.len(), out.len()),
        ));
    }
    if groups == 0 {
        return Ok(());
    }
    let func = dev.function("moe", SOURCE, "dequant_mxfp4_bf16")?;
    let groups_i64 = groups as i64;
    let mut l = dev.stream.launch_builder(&func);
    l.arg(blocks).arg(scales).arg(out).arg(&groups_i64);
    // SAFETY: matches dequant_mxfp4_bf16; blocks hold 16 bytes and out 32 bf16 per group (checked
    // above), and device allocations are 256-byte aligned, so the 4- and 16-byte accesses are too.
    unsafe { l.launch(grid_stride(groups * 4)) }.map_err(driver_err("dequant_mxfp4"))?;
    Ok(())
}

/// Rows of x up to which [`gemv_mxfp4`] runs (its largest compiled entry).
pub const GEMV_MXFP4_MAX_T: usize = 8;

/// `out = x · Wᵀ` with W `[n, k]` in MXFP4 (`blocks` `n·k/2` bytes, `scales` `n·k/32`), read
/// packed: x `[t, k]` f32 with `t ≤ GEMV_MXFP4_MAX_T`, out `[t, n]` f32.
pub fn gemv_mxfp4(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    blocks: &CudaSlice<u8>,
    scales: &CudaSlice<u8>,
    n: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let groups = scales.len().checked_div(n).unwrap_or(0);
    let k = groups * 32;
    let t = x.len().checked_div(k).unwrap_or(0);
    if n == 0
        || groups == 0
        || scales.len() != n * groups
        || blocks.len() != n * groups * 16
        || x.len() != t * k
        || !(1..=GEMV_MXFP4_MAX_T).contains(&t)
        || out.len() != t * n
        || i32::try_from(n * groups).is_err()
    {
        return Err(shape(
            "cuda gemv_mxfp4",
            format!(
                "x {}, {} block bytes, {} scales for {n} rows, out {}",
                x.len(),
                blocks.len(),
                scales.len(),
                out.len()
            ),
        ));
    }
    let tt = [1, 2, 4, 8].into_iter().find(|&c| c >= t).unwrap_or(GEMV_MXFP4_MAX_T);
    let func = dev.function("moe", SOURCE, &format!("gemv_mxfp4_t{tt}"))?;
    let (t_i32, n_i32, g_i32) = (t as i32, n as i32, groups as i32);
    let cfg = LaunchConfig { grid_dim: (n.div_ceil(4) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    let mut l = dev.stream.launch_builder(&func);
    l.arg(x).arg(blocks).arg(scales).arg(out).arg(&t_i32).arg(&n_i32).arg(&g_i32);
    // SAFETY: sizes checked above; a warp per output row reads that row's groups (16-byte block
    // loads, aligned: allocations are 256-byte aligned and a row is groups · 16 bytes) and x's rows
    // of k = 32 · groups floats (16-byte loads at multiples of 8 floats).
    unsafe { l.launch(cfg) }.map_err(driver_err("gemv_mxfp4"))?;
    Ok(())
}

/// `out [b, a] = srcᵀ` for src `[a, b]`; both of one dtype (moved as raw 1-, 2- or 4-byte
/// elements).
pub fn transpose(dev: &CudaDevice, src: &CudaStorage, out: &mut CudaStorage, a: usize, b: usize) -> Result<()> {
    if src.dtype() != out.dtype() || src.len() != a * b || out.len() != a * b {
        return Err(shape("cuda transpose", format!("[{a}, {b}] from {} into {} elements", src.len(), out.len())));
    }
    if a == 0 || b == 0 {
        return Ok(());
    }
    let (a_i32, b_i32) = match (i32::try_from(a), i32::try_from(b)) {
        (Ok(x), Ok(y)) if b.div_ceil(32) <= 1 << 31 && a.div_ceil(32) <= 65_535 => (x, y),
        _ => return Err(shape("cuda transpose", format!("[{a}, {b}] is too large for one launch"))),
    };
    let name = match src.dtype().size_bytes() {
        1 => "transpose_u8",
        2 => "transpose_u16",
        _ => "transpose_u32",
    };
    let func = dev.function("moe", SOURCE, name)?;
    let cfg = LaunchConfig {
        grid_dim: (b.div_ceil(32) as u32, a.div_ceil(32) as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    let mut l = dev.stream.launch_builder(&func);
    src.push_arg(&mut l);
    out.push_arg(&mut l);
    l.arg(&a_i32).arg(&b_i32);
    // SAFETY: matches transpose_u*; both buffers hold a·b elements of the kernel's element size.
    unsafe { l.launch(cfg) }.map_err(driver_err("transpose"))?;
    Ok(())
}

/// `out[i, :] = src[rows[i], :]`, rows of n f32; `rows` on the device, each below
/// `src.len() / n` (checked by the caller).
pub fn gather_rows(
    dev: &CudaDevice,
    src: &CudaSlice<f32>,
    rows: &CudaSlice<u32>,
    n: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let r = rows.len();
    if out.len() != r * n || n == 0 {
        return Err(shape("cuda gather_rows", format!("{r} rows of {n} into {} elements", out.len())));
    }
    if r == 0 {
        return Ok(());
    }
    let func = dev.function("moe", SOURCE, "gather_rows_f32")?;
    let (r_i64, n_i64) = (r as i64, n as i64);
    let mut l = dev.stream.launch_builder(&func);
    l.arg(src).arg(rows).arg(out).arg(&r_i64).arg(&n_i64);
    // SAFETY: matches gather_rows_f32; out holds r·n elements, every row index is in src.
    unsafe { l.launch(grid_stride(r * n)) }.map_err(driver_err("gather_rows"))?;
    Ok(())
}

/// `dst[rows[i], :] += weights[i] · src[i, :]`, rows of n f32; `rows` (distinct, each below
/// `dst.len() / n`) and `weights` on the device, checked by the caller.
pub fn scatter_add_rows(
    dev: &CudaDevice,
    src: &CudaSlice<f32>,
    rows: &CudaSlice<u32>,
    weights: &CudaSlice<f32>,
    n: usize,
    dst: &mut CudaSlice<f32>,
) -> Result<()> {
    let r = rows.len();
    if src.len() != r * n || weights.len() != r || n == 0 {
        return Err(shape("cuda scatter_add_rows", format!("{r} rows of {n} from {} elements", src.len())));
    }
    if r == 0 {
        return Ok(());
    }
    let func = dev.function("moe", SOURCE, "scatter_add_rows_f32")?;
    let (r_i64, n_i64) = (r as i64, n as i64);
    let mut l = dev.stream.launch_builder(&func);
    l.arg(src).arg(rows).arg(weights).arg(dst).arg(&r_i64).arg(&n_i64);
    // SAFETY: matches scatter_add_rows_f32; src holds r·n elements, rows are distinct and in dst.
    unsafe { l.launch(grid_stride(r * n)) }.map_err(driver_err("scatter_add_rows"))?;
    Ok(())
}
