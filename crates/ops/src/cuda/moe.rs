//! Launchers for `kernels/moe.cu`: the GPT-OSS clamped SwiGLU and the router top-k.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{CudaDevice, driver_err, grid_stride, shape};
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
