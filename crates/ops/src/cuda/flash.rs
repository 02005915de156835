//! Launchers for the fast attention kernels: `kernels/flash_attn.cu` (prefill, tensor cores;
//! on compute capability 9.0 `flash_sm90.rs` goes first) and `kernels/decode_attn.cu` (split
//! over the context). Both take the same arguments as the
//! reference kernel in `attention.rs` and return `Ok(false)` for a shape they do not cover, so
//! the caller falls back to it.

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::attention::{check_shapes, launch};
use super::graph::Limit;
use super::pdl::{self, Arg};
use super::{CudaDevice, DeviceBuf, driver_err};
use crate::{AttnGeometry, Result};

/// Source text of `kernels/flash_attn.cu`.
pub const FLASH_SOURCE: &str = include_str!("../../kernels/flash_attn.cu");
/// Source text of `kernels/decode_attn.cu`.
pub const DECODE_SOURCE: &str = include_str!("../../kernels/decode_attn.cu");

/// Queries per call up to which the split-context kernel is used; longer calls take flash.
pub const DECODE_MAX_T: usize = 4;

/// Flash prefill for head dims 64 and 128 (other dims: `Ok(false)`): the wgmma kernel of
/// `flash_sm90.rs` where the device has it (compute capability 9.0 and `OLLM_FLASH_SM90=1`),
/// else [`flash_prefill_mma`].
#[allow(clippy::too_many_arguments)]
pub fn flash_prefill(
    dev: &CudaDevice,
    q: &CudaSlice<f32>,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
    g: AttnGeometry,
    scale: f32,
    window: Option<usize>,
    sinks: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<f32>,
) -> Result<bool> {
    if super::flash_sm90::sm90_available(dev)
        && super::flash_sm90::flash_prefill_sm90(dev, q, k, v, g, scale, window, sinks, out, None)?
    {
        return Ok(true);
    }
    flash_prefill_mma(dev, q, k, v, g, scale, window, sinks, out)
}

/// The mma.sync flash prefill (any compute capability ≥ 8.0) for head dims 64 and 128 (other
/// dims: `Ok(false)`).
#[allow(clippy::too_many_arguments)]
pub fn flash_prefill_mma(
    dev: &CudaDevice,
    q: &CudaSlice<f32>,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
    g: AttnGeometry,
    scale: f32,
    window: Option<usize>,
    sinks: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<f32>,
) -> Result<bool> {
    let t = check_shapes(q, k, v, g, sinks, out)?;
    // (rows per warp tile MT, key tile BN): the fastest measured variant per head dim.
    let (mt, bn) = match g.d {
        128 => (2, 32),
        64 => (2, 64),
        _ => return Ok(false),
    };
    let bm = 64 * mt;
    let func = dev.function("flash_attn", FLASH_SOURCE, &format!("flash_prefill_d{}_m{mt}_n{bn}", g.d))?;
    let smem = (bm + 4 * bn) * g.d * 2;
    // SAFETY: flash_prefill_* takes the attention layout and covers bm query rows a block of
    // 128 threads; t came from check_shapes above.
    unsafe {
        launch_flash(dev, &func, (bm, 128, smem), t, q, [k, v], g, scale, window, sinks, out, "flash attention")
    }?;
    Ok(true)
}

/// The launch both flash prefill kernels share: a grid of (query heads, blocks of `rows` query
/// rows), `threads` a block, `smem` bytes of dynamic shared memory (the function's limit is
/// raised to it first), and the attention parameters of [`launch`].
///
/// # Safety
/// `func` takes (q, k, v, out, T, n_heads, n_kv, cap, pos0, scale, window, sinks, has_sinks)
/// and covers `rows` query rows a block; `t` came from `check_shapes` on these buffers.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn launch_flash(
    dev: &CudaDevice,
    func: &CudaFunction,
    (rows, threads, smem): (usize, u32, usize),
    t: usize,
    q: &CudaSlice<f32>,
    [k, v]: [&CudaSlice<bf16>; 2],
    g: AttnGeometry,
    scale: f32,
    window: Option<usize>,
    sinks: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<f32>,
    what: &'static str,
) -> Result<()> {
    func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
        .map_err(|e| crate::OpsError::Backend(format!("cuda {what} shared memory: {e}")))?;
    let cfg = LaunchConfig {
        grid_dim: (g.n_heads as u32, t.div_ceil(rows) as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let ints = [t as i32, g.n_heads as i32, g.n_kv as i32, g.cap as i32, g.pos0 as i32];
    // SAFETY: the caller's contract: the parameter layout of `launch`, shapes checked, and the
    // dynamic shared memory limit was raised to what the launch asks for just above.
    unsafe { launch(dev, func, cfg, q, [k, v], out, &ints, scale, window, sinks, what) }
}

/// Query heads a decode block takes together: the largest divisor of the GQA group ≤ 8 that
/// has a compiled entry.
fn heads_per_block(group: usize) -> usize {
    [8, 6, 4, 3, 2, 1].into_iter().find(|b| group.is_multiple_of(*b)).unwrap_or(1)
}

/// Split-context decode attention for a few queries (T ≤ [`DECODE_MAX_T`]) and head dims
/// 16, 32, 64, 128, 256 (others: `Ok(false)`).
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(
    dev: &CudaDevice,
    q: &CudaSlice<f32>,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
    g: AttnGeometry,
    scale: f32,
    window: Option<usize>,
    sinks: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<f32>,
) -> Result<bool> {
    let t = check_shapes(q, k, v, g, sinks, out)?;
    if !matches!(g.d, 16 | 32 | 64 | 128 | 256) || t > DECODE_MAX_T {
        return Ok(false);
    }
    let group = g.n_heads / g.n_kv;
    let gb = heads_per_block(group);
    // Inside a captured decode step (graph.rs) the query positions come from the step buffer.
    let step = dev.graphs.capturing_step();
    let plain = dev.function("decode_attn", DECODE_SOURCE, &format!("decode_split_d{}_g{gb}", g.d))?;
    let func = match step {
        Some(_) => dev.function("decode_attn", DECODE_SOURCE, &format!("decode_split_step_d{}_g{gb}", g.d))?,
        None => plain.clone(),
    };
    // The plain entry's occupancy sizes the split in both modes, so that a captured step cuts
    // the context as the plain launches do (its registers may differ by the extra argument).
    let blocks_per_sm = plain
        .occupancy_max_active_blocks_per_multiprocessor(128, 0, None)
        .map_err(driver_err("decode attention occupancy"))?
        .max(1) as usize;
    let sms = dev
        .ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(driver_err("decode attention SM count"))?
        .max(1) as usize;
    let blocks_y = g.n_kv * (group / gb);
    let span = g.pos0 + t; // the longest key range of any query in this call
    let span = window.map_or(span, |w| span.min(w));
    let (slots, other_blocks) = (sms * blocks_per_sm, blocks_y * t);
    let mut plan = split_plan(span, slots, other_blocks);
    if step.is_some() {
        // A graph serves the spans up to the next power of two (at most the cache, or the
        // window) with this chunk: the slices past a replay's keys add exact zeros, so its
        // result equals the plain path's at that span bit for bit.
        let most = window.map_or(g.cap, |w| w.min(g.cap)).max(span);
        let bucket = span.next_power_of_two().min(most);
        plan.splits = plan.splits.max(bucket.div_ceil(plan.chunk));
        let limit = Limit::Split { chunk: plan.chunk, splits: plan.splits, window, slots, other_blocks };
        dev.graphs.note_limit(limit);
        dev.graphs.note_limit(Limit::Rows(g.cap));
    }

    let rows = t * g.n_heads * plan.splits;
    let ints = [g.n_heads as i32, g.n_kv as i32, g.cap as i32, g.pos0 as i32];
    let window_i32 = window.map_or(0, |w| w as i32);
    let chunk_i32 = plan.chunk as i32;
    let cfg = LaunchConfig {
        grid_dim: (plan.splits as u32, blocks_y as u32, t as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let combine = dev.function("decode_attn", DECODE_SOURCE, "decode_combine")?;
    let (n_heads_i32, d_i32, splits_i32) = (g.n_heads as i32, g.d as i32, plan.splits as i32);
    let has_sinks = i32::from(sinks.is_some());
    let combine_cfg =
        LaunchConfig { grid_dim: ((t * g.n_heads) as u32, 1, 1), block_dim: (g.d as u32, 1, 1), shared_mem_bytes: 0 };
    let mut run = |part: &mut DeviceBuf<f32>| -> Result<()> {
        if dev.pdl() {
            let mut args = vec![Arg::buf(dev, q), Arg::buf(dev, k), Arg::buf(dev, v), Arg::buf(dev, &**part)];
            args.extend(ints.map(Arg::I32));
            args.extend([Arg::F32(scale), Arg::I32(window_i32), Arg::I32(chunk_i32)]);
            args.extend(step.map(Arg::Ptr));
            // SAFETY: as the plain launches below; both kernels open with pdl_sync (pdl.rs).
            unsafe { pdl::launch(dev, &func, cfg, &args) }?;
            let sinks_arg = sinks.map_or_else(|| Arg::buf(dev, q), |s| Arg::buf(dev, s));
            let args = [
                Arg::buf(dev, &**part),
                Arg::buf(dev, &*out),
                Arg::I32(n_heads_i32),
                Arg::I32(d_i32),
                Arg::I32(splits_i32),
                sinks_arg,
                Arg::I32(has_sinks),
            ];
            // SAFETY: as above.
            return unsafe { pdl::launch(dev, &combine, combine_cfg, &args) };
        }
        let mut l = dev.stream.launch_builder(&func);
        l.arg(q).arg(k).arg(v).arg(&mut **part);
        for i in &ints {
            l.arg(i);
        }
        l.arg(&scale).arg(&window_i32).arg(&chunk_i32);
        if let Some(step) = &step {
            l.arg(step);
        }
        // SAFETY: argument order and types match decode_split_*; shapes checked above; the
        // grid covers exactly `splits` partials per (token, head), inside `part`.
        unsafe { l.launch(cfg) }.map_err(driver_err("decode attention"))?;
        let mut l = dev.stream.launch_builder(&combine);
        l.arg(&**part).arg(&mut *out).arg(&n_heads_i32).arg(&d_i32).arg(&splits_i32);
        match sinks {
            Some(s) => l.arg(s),
            None => l.arg(q),
        };
        l.arg(&has_sinks);
        // SAFETY: reads the partials written by the launch above; one thread per output element.
        unsafe { l.launch(combine_cfg) }.map_err(driver_err("decode attention combine"))?;
        Ok(())
    };
    if step.is_some() {
        // Not the shared scratch: growing it inside a capture would make it a graph allocation.
        // SAFETY: pass 1 writes every partial (blocks with no keys write m = -inf, l = 0)
        // before pass 2 reads them.
        let mut part = unsafe { dev.alloc_uninit::<f32>(rows * (g.d + 2), "decode attention partials") }?;
        run(&mut part)?;
        return Ok(true);
    }
    // SAFETY: pass 1 writes every partial (blocks with no keys write m = -inf, l = 0) before
    // pass 2 reads them; the buffer is reused across calls in stream order.
    unsafe { dev.with_scratch32(rows * (g.d + 2), "decode attention partials", run) }?;
    Ok(true)
}

/// How the context is cut: `splits` slices of `chunk` keys each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SplitPlan {
    pub splits: usize,
    pub chunk: usize,
}

/// Slices sized so that the grid (`other_blocks` × splits) is about one wave of `slots`
/// resident blocks (measured best on an H100: 76% of copy bandwidth against 51% at twice as
/// many), at least 256 keys each, in multiples of 64.
pub(crate) fn split_plan(span: usize, slots: usize, other_blocks: usize) -> SplitPlan {
    let want = slots.div_ceil(other_blocks.max(1)).max(1);
    let chunk = span.div_ceil(want).max(256).next_multiple_of(64);
    SplitPlan { splits: span.div_ceil(chunk).max(1), chunk }
}

#[cfg(test)]
mod tests {
    use super::{SplitPlan, heads_per_block, split_plan};

    #[test]
    fn split_plan_fills_one_wave() {
        // Llama-3.1-8B shape at 32K: 8 kv groups, 132 SMs × 2 blocks.
        assert_eq!(split_plan(32768, 264, 8), SplitPlan { splits: 32, chunk: 1024 });
        // Short contexts keep at least 256 keys a slice.
        assert_eq!(split_plan(300, 264, 8), SplitPlan { splits: 2, chunk: 256 });
        assert_eq!(split_plan(1, 264, 8), SplitPlan { splits: 1, chunk: 256 });
        // Every key is covered exactly once.
        for span in [1, 63, 64, 65, 1000, 4097, 100_000] {
            let p = split_plan(span, 264, 3);
            assert!(p.splits * p.chunk >= span && (p.splits - 1) * p.chunk < span, "{span}: {p:?}");
        }
    }

    #[test]
    fn heads_per_block_divides_the_group() {
        for (group, gb) in [(1, 1), (3, 3), (4, 4), (5, 1), (8, 8), (9, 3), (12, 6), (16, 8), (64, 8)] {
            assert_eq!(heads_per_block(group), gb, "group {group}");
        }
    }
}
