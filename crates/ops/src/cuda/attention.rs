//! Launcher for `kernels/attention.cu`, the reference kernel: any head dim up to 256, one block
//! per (query, head). The fast paths are in `flash.rs`; [`check_shapes`] is shared by all.

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::{CudaDevice, driver_err, shape};
pub use crate::AttnGeometry;
use crate::Result;

/// The kernel file's source text.
pub const SOURCE: &str = include_str!("../../kernels/attention.cu");

/// Checks the buffers of one attention call against its geometry (every attention launcher
/// goes through here) and returns the number of query tokens T.
pub fn check_shapes(
    q: &CudaSlice<f32>,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
    g: AttnGeometry,
    sinks: Option<&CudaSlice<f32>>,
    out: &CudaSlice<f32>,
) -> Result<usize> {
    let row = g.n_heads * g.d;
    let t = q.len().checked_div(row).unwrap_or(0);
    let bad = row == 0
        || g.d > 256
        || g.n_kv == 0
        || !g.n_heads.is_multiple_of(g.n_kv)
        || q.len() != t * row
        || out.len() != q.len()
        || k.len() != g.n_kv * g.cap * g.d
        || v.len() != k.len()
        || g.pos0 + t > g.cap
        || sinks.is_some_and(|s| s.len() != g.n_heads);
    if bad {
        return Err(shape(
            "cuda attention",
            format!("q {}, k {}, v {}, out {}, {g:?}", q.len(), k.len(), v.len(), out.len()),
        ));
    }
    Ok(t)
}

/// The reference kernel (any head dim ≤ 256): q, out `[T, n_heads, d]` f32; k, v
/// `[n_kv, cap, d]` bf16 (the KV cache); `window` None = full causal; sinks `[n_heads]` f32.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    dev: &CudaDevice,
    q: &CudaSlice<f32>,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
    g: AttnGeometry,
    scale: f32,
    window: Option<usize>,
    sinks: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let t = check_shapes(q, k, v, g, sinks, out)?;
    if t > 65_535 * 32 {
        return Err(shape("cuda attention", format!("{t} query tokens exceed the reference kernel's grid")));
    }
    let func = dev.function("attention", SOURCE, "attention_bf16kv")?;
    let ints = [g.n_heads as i32, g.n_kv as i32, g.d as i32, g.cap as i32, g.pos0 as i32];
    let cfg = LaunchConfig { grid_dim: ((t * g.n_heads) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: attention_bf16kv takes (q, k, v, out, n_heads, n_kv, d, cap, pos0, scale, window,
    // sinks, has_sinks); sizes checked above.
    unsafe { launch(dev, &func, cfg, q, [k, v], out, &ints, scale, window, sinks, "attention") }
}

/// Launches an attention kernel whose parameters are `(q, k, v, out, ints…, scale, window,
/// sinks, has_sinks)` — the layout every attention kernel here shares. `window` None is passed
/// as 0; without sinks q stands in as a valid pointer (the kernel never reads it then).
///
/// # Safety
/// `func`'s parameter list must be exactly that, and the buffers must match `cfg`'s grid.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn launch(
    dev: &CudaDevice,
    func: &CudaFunction,
    cfg: LaunchConfig,
    q: &CudaSlice<f32>,
    [k, v]: [&CudaSlice<bf16>; 2],
    out: &mut CudaSlice<f32>,
    ints: &[i32],
    scale: f32,
    window: Option<usize>,
    sinks: Option<&CudaSlice<f32>>,
    what: &'static str,
) -> Result<()> {
    let window_i32 = window.map_or(0, |w| w as i32);
    let has_sinks = i32::from(sinks.is_some());
    let mut l = dev.stream.launch_builder(func);
    l.arg(q).arg(k).arg(v).arg(out);
    for i in ints {
        l.arg(i);
    }
    l.arg(&scale).arg(&window_i32);
    match sinks {
        Some(s) => l.arg(s),
        None => l.arg(q),
    };
    l.arg(&has_sinks);
    // SAFETY: forwarded to the caller.
    unsafe { l.launch(cfg) }.map_err(driver_err(what))?;
    Ok(())
}
