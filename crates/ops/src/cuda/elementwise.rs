//! Launchers for `kernels/elementwise.cu`: embedding gather, SiLU·mul, GELU(tanh)·mul, scaling,
//! softcapping, residual add, bias add, KV write.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::graph::Limit;
use super::{CudaDevice, CudaStorage, driver_err, grid_stride, shape};
use crate::Result;

/// The kernel file's source text.
pub const SOURCE: &str = include_str!("../../kernels/elementwise.cu");

/// `out[t, :] = table[ids[t], :]`; table `[V, hidden]` (bf16, f16 or f32), ids on the device
/// (checked < V by the caller), out `[T, hidden]` f32.
pub fn embedding(
    dev: &CudaDevice,
    table: &CudaStorage,
    ids: &CudaSlice<u32>,
    hidden: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    if hidden == 0 || !table.len().is_multiple_of(hidden) || out.len() != ids.len() * hidden {
        return Err(shape(
            "cuda embedding",
            format!("table {}, {} ids, hidden {hidden}, out {}", table.len(), ids.len(), out.len()),
        ));
    }
    let func = dev.function("elementwise", SOURCE, &format!("embedding_{}", table.kernel_suffix()))?;
    let hidden_i32 = hidden as i32;
    let cfg = LaunchConfig { grid_dim: (ids.len() as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut l = dev.stream.launch_builder(&func);
    table.push_arg(&mut l);
    l.arg(ids).arg(out).arg(&hidden_i32);
    // SAFETY: matches the kernel signature; out holds ids.len() rows of `hidden`.
    unsafe { l.launch(cfg) }.map_err(driver_err("embedding"))?;
    Ok(())
}

/// [`embedding`] inside a captured decode step: the ids are the `t` u32 at `step + 4` (the
/// step buffer of graph.rs, written before each replay; the caller checked them < V).
pub(crate) fn embedding_step(
    dev: &CudaDevice,
    table: &CudaStorage,
    step: u64,
    t: usize,
    hidden: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    if hidden == 0 || !table.len().is_multiple_of(hidden) || out.len() != t * hidden || t == 0 {
        return Err(shape(
            "cuda embedding",
            format!("table {}, {t} ids, hidden {hidden}, out {}", table.len(), out.len()),
        ));
    }
    let func = dev.function("elementwise", SOURCE, &format!("embedding_{}", table.kernel_suffix()))?;
    let (hidden_i32, ids) = (hidden as i32, step + 4);
    let cfg = LaunchConfig { grid_dim: (t as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut l = dev.stream.launch_builder(&func);
    table.push_arg(&mut l);
    l.arg(&ids).arg(out).arg(&hidden_i32);
    // SAFETY: the ids pointer addresses t u32 of the step buffer (t ≤ MAX_STEP_ROWS, checked
    // when the buffer was written); out holds t rows of `hidden`.
    unsafe { l.launch(cfg) }.map_err(driver_err("embedding"))?;
    Ok(())
}

/// `out = silu(gate) ⊙ up`.
pub fn silu_mul(dev: &CudaDevice, gate: &CudaSlice<f32>, up: &CudaSlice<f32>, out: &mut CudaSlice<f32>) -> Result<()> {
    if gate.len() != up.len() || out.len() != gate.len() {
        return Err(shape("cuda silu_mul", format!("gate {}, up {}, out {}", gate.len(), up.len(), out.len())));
    }
    let func = dev.function("elementwise", SOURCE, "silu_mul_f32")?;
    let n = gate.len() as i64;
    let mut l = dev.stream.launch_builder(&func);
    l.arg(gate).arg(up).arg(out).arg(&n);
    // SAFETY: all three buffers hold n elements.
    unsafe { l.launch(grid_stride(gate.len())) }.map_err(driver_err("silu_mul"))?;
    Ok(())
}

/// `out = gelu_tanh(gate) ⊙ up` (CPU twin: `cpu::gelu_tanh_mul`).
pub fn gelu_tanh_mul(
    dev: &CudaDevice,
    gate: &CudaSlice<f32>,
    up: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    if gate.len() != up.len() || out.len() != gate.len() {
        return Err(shape("cuda gelu_tanh_mul", format!("gate {}, up {}, out {}", gate.len(), up.len(), out.len())));
    }
    let func = dev.function("elementwise", SOURCE, "gelu_tanh_mul_f32")?;
    let n = gate.len() as i64;
    let mut l = dev.stream.launch_builder(&func);
    l.arg(gate).arg(up).arg(out).arg(&n);
    // SAFETY: all three buffers hold n elements.
    unsafe { l.launch(grid_stride(gate.len())) }.map_err(driver_err("gelu_tanh_mul"))?;
    Ok(())
}

/// `x ← s · x` (CPU twin: `cpu::elementwise::scale`).
pub fn scale(dev: &CudaDevice, x: &mut CudaSlice<f32>, s: f32) -> Result<()> {
    let func = dev.function("elementwise", SOURCE, "scale_f32")?;
    let n = x.len() as i64;
    let cfg = grid_stride(x.len());
    let mut l = dev.stream.launch_builder(&func);
    l.arg(&mut *x).arg(&s).arg(&n);
    // SAFETY: x holds n elements.
    unsafe { l.launch(cfg) }.map_err(driver_err("scale"))?;
    Ok(())
}

/// `x ← cap · tanh(x / cap)` (CPU twin: `cpu::softcap`).
pub fn softcap(dev: &CudaDevice, x: &mut CudaSlice<f32>, cap: f32) -> Result<()> {
    let func = dev.function("elementwise", SOURCE, "softcap_f32")?;
    let n = x.len() as i64;
    let cfg = grid_stride(x.len());
    let mut l = dev.stream.launch_builder(&func);
    l.arg(&mut *x).arg(&cap).arg(&n);
    // SAFETY: x holds n elements.
    unsafe { l.launch(cfg) }.map_err(driver_err("softcap"))?;
    Ok(())
}

/// `x += y`.
pub fn add_assign(dev: &CudaDevice, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>) -> Result<()> {
    if x.len() != y.len() {
        return Err(shape("cuda add_assign", format!("x {}, y {}", x.len(), y.len())));
    }
    let func = dev.function("elementwise", SOURCE, "add_assign_f32")?;
    let n = x.len() as i64;
    let cfg = grid_stride(x.len());
    let mut l = dev.stream.launch_builder(&func);
    l.arg(x).arg(y).arg(&n);
    // SAFETY: both buffers hold n elements.
    unsafe { l.launch(cfg) }.map_err(driver_err("add_assign"))?;
    Ok(())
}

/// `out[t, :] += bias` for out `[T, n]` f32 and bias `[n]` (bf16, f16 or f32).
pub fn add_bias(dev: &CudaDevice, out: &mut CudaSlice<f32>, bias: &CudaStorage, n: usize) -> Result<()> {
    if n == 0 || bias.len() != n || !out.len().is_multiple_of(n) || i32::try_from(n).is_err() {
        return Err(shape("cuda add_bias", format!("out {}, bias {}, row length {n}", out.len(), bias.len())));
    }
    let func = dev.function("elementwise", SOURCE, &format!("add_bias_{}", bias.kernel_suffix()))?;
    let (n_i32, total) = (n as i32, out.len() as i64);
    let cfg = grid_stride(out.len());
    let mut l = dev.stream.launch_builder(&func);
    l.arg(out);
    bias.push_arg(&mut l);
    l.arg(&n_i32).arg(&total);
    // SAFETY: out holds total elements, bias n (checked above).
    unsafe { l.launch(cfg) }.map_err(driver_err("add_bias"))?;
    Ok(())
}

/// Geometry of a KV cache `[n_kv, cap, d]`.
#[derive(Debug, Clone, Copy)]
pub struct KvGeometry {
    pub n_kv: usize,
    pub cap: usize,
    pub d: usize,
}

/// Writes `src` `[T, n_kv, d]` f32 into the bf16 `cache` `[n_kv, cap, d]` at positions
/// `pos0..pos0+T`, rounding to nearest even.
pub fn write_kv(
    dev: &CudaDevice,
    cache: &mut CudaSlice<bf16>,
    src: &CudaSlice<f32>,
    g: KvGeometry,
    pos0: usize,
) -> Result<()> {
    let row = g.n_kv * g.d;
    if row == 0
        || !src.len().is_multiple_of(row)
        || cache.len() != g.n_kv * g.cap * g.d
        || pos0 + src.len() / row > g.cap
    {
        return Err(shape("cuda write_kv", format!("cache {} ({g:?}), src {}, pos0 {pos0}", cache.len(), src.len())));
    }
    // Inside a captured decode step the positions are read from the step buffer (graph.rs).
    let step = dev.graphs.capturing_step();
    let func =
        dev.function("elementwise", SOURCE, if step.is_some() { "write_kv_bf16_step" } else { "write_kv_bf16" })?;
    let (t, n_kv, cap, d, p) = ((src.len() / row) as i32, g.n_kv as i32, g.cap as i32, g.d as i32, pos0 as i32);
    let cfg = grid_stride(src.len());
    let mut l = dev.stream.launch_builder(&func);
    l.arg(cache).arg(src).arg(&t).arg(&n_kv).arg(&cap).arg(&d).arg(&p);
    if let Some(step) = &step {
        l.arg(step);
        dev.graphs.note_limit(Limit::Rows(g.cap));
    }
    // SAFETY: positions pos0..pos0+t fit the cache (checked above; a replayed step's by its Limit).
    unsafe { l.launch(cfg) }.map_err(driver_err("write_kv"))?;
    Ok(())
}
