//! Launcher for `kernels/rope.cu`.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::graph::Limit;
use super::pdl::{self, Arg};
use super::{CudaDevice, driver_err, grid_stride, shape};
use crate::Result;

/// The kernel file's source text.
pub const SOURCE: &str = include_str!("../../kernels/rope.cu");

/// Rotates the first `r` dims of every head of x `[T, heads, d]` in place for positions
/// `pos0..pos0+T`; cos/sin `[positions, r/2]`.
#[allow(clippy::too_many_arguments)]
pub fn rope(
    dev: &CudaDevice,
    x: &mut CudaSlice<f32>,
    heads: usize,
    d: usize,
    r: usize,
    cos: &CudaSlice<f32>,
    sin: &CudaSlice<f32>,
    pos0: usize,
) -> Result<()> {
    let per_token = heads * d;
    let t = x.len().checked_div(per_token).unwrap_or(0);
    let half = r / 2;
    if per_token == 0
        || x.len() != t * per_token
        || r > d
        || !r.is_multiple_of(2)
        || cos.len() != sin.len()
        || (pos0 + t) * half > cos.len()
    {
        return Err(shape(
            "cuda rope",
            format!("x {}, heads {heads}, d {d}, r {r}, table {}, pos0 {pos0}", x.len(), cos.len()),
        ));
    }
    // Inside a captured decode step the positions are read from the step buffer (graph.rs).
    let step = dev.graphs.capturing_step();
    let func = dev.function("rope", SOURCE, if step.is_some() { "rope_f32_step" } else { "rope_f32" })?;
    let (ti, hi, di, ri, pi) = (t as i32, heads as i32, d as i32, r as i32, pos0 as i32);
    let cfg = grid_stride(t * heads * half);
    let mut l = dev.stream.launch_builder(&func);
    l.arg(x).arg(cos).arg(sin).arg(&ti).arg(&hi).arg(&di).arg(&ri).arg(&pi);
    if let Some(step) = &step {
        l.arg(step);
        dev.graphs.note_limit(Limit::Rows(cos.len() / half.max(1)));
    }
    // SAFETY: sizes checked above (a replayed step's rows are kept inside the table by its
    // Limit); the kernel touches t*heads*d elements of x and table rows < pos0+t.
    unsafe { l.launch(cfg) }.map_err(driver_err("rope"))?;
    Ok(())
}

/// The device buffers of [`rope_write_kv`]: q `[T, nh, d]` and k `[T, nkv, d]` (rotated in
/// place), v `[T, nkv, d]`, and the bf16 caches `[nkv, cap, d]`.
pub struct RopeKv<'a> {
    pub q: &'a mut CudaSlice<f32>,
    pub k: &'a mut CudaSlice<f32>,
    pub v: &'a CudaSlice<f32>,
    pub k_cache: &'a mut CudaSlice<half::bf16>,
    pub v_cache: &'a mut CudaSlice<half::bf16>,
}

/// `rope(q)`, `rope(k)` at positions `pos0..`, `write_kv` of k and v at rows `row0..` in one
/// launch, equal to those four launches bit for bit. `(nh, nkv, d, r, cap)`: heads of q and of
/// k/v, head dim, rotary dims, cache rows; cos/sin `[positions, r/2]`.
pub fn rope_write_kv(
    dev: &CudaDevice,
    b: RopeKv<'_>,
    (nh, nkv, d, r, cap): (usize, usize, usize, usize, usize),
    (cos, sin): (&CudaSlice<f32>, &CudaSlice<f32>),
    (pos0, row0): (usize, usize),
) -> Result<()> {
    let t = b.q.len().checked_div(nh * d).unwrap_or(0);
    let half = r / 2;
    if nh * d == 0
        || nkv == 0
        || b.q.len() != t * nh * d
        || b.k.len() != t * nkv * d
        || b.v.len() != t * nkv * d
        || b.k_cache.len() != nkv * cap * d
        || b.v_cache.len() != nkv * cap * d
        || row0 + t > cap
        || r > d
        || !r.is_multiple_of(2)
        || cos.len() != sin.len()
        || (pos0 + t) * half > cos.len()
    {
        return Err(shape(
            "cuda rope_write_kv",
            format!(
                "q {}, k {}, v {}, caches {}/{} ([{nkv}, {cap}, {d}]), heads {nh}, r {r}, table {}, pos0 {pos0}, row0 {row0}",
                b.q.len(),
                b.k.len(),
                b.v.len(),
                b.k_cache.len(),
                b.v_cache.len(),
                cos.len()
            ),
        ));
    }
    // Inside a captured decode step the positions are read from the step buffer (graph.rs).
    let step = dev.graphs.capturing_step();
    let func =
        dev.function("rope", SOURCE, if step.is_some() { "rope_write_kv_f32_step" } else { "rope_write_kv_f32" })?;
    let [ti, nhi, nkvi, di, ri, capi, pi, r0i] = [t, nh, nkv, d, r, cap, pos0, row0].map(|v| v as i32);
    let cfg = grid_stride(t * (nh * half + nkv * (d - half) + nkv * d));
    if dev.pdl() {
        let mut args = vec![Arg::buf(dev, b.q), Arg::buf(dev, b.k), Arg::buf(dev, b.v), Arg::buf(dev, cos)];
        args.extend([Arg::buf(dev, sin), Arg::buf(dev, b.k_cache), Arg::buf(dev, b.v_cache)]);
        args.extend([ti, nhi, nkvi, di, ri, capi, pi, r0i].map(Arg::I32));
        if let Some(step) = step {
            args.push(Arg::Ptr(step));
            dev.graphs.note_limit(Limit::Rows(cos.len() / half.max(1)));
            dev.graphs.note_limit(Limit::Rows(cap));
        }
        // SAFETY: as below; the kernel opens with pdl_sync (pdl.rs).
        return unsafe { pdl::launch(dev, &func, cfg, &args) };
    }
    let mut l = dev.stream.launch_builder(&func);
    l.arg(b.q).arg(b.k).arg(b.v).arg(cos).arg(sin).arg(b.k_cache).arg(b.v_cache);
    l.arg(&ti).arg(&nhi).arg(&nkvi).arg(&di).arg(&ri).arg(&capi).arg(&pi).arg(&r0i);
    if let Some(step) = &step {
        l.arg(step);
        dev.graphs.note_limit(Limit::Rows(cos.len() / half.max(1)));
        dev.graphs.note_limit(Limit::Rows(cap));
    }
    // SAFETY: sizes checked above (a replayed step's rows are kept inside the table and the
    // caches by its Limits); the kernel touches t rows of q, k, v, table rows < pos0 + t and
    // cache rows row0..row0 + t.
    unsafe { l.launch(cfg) }.map_err(driver_err("rope_write_kv"))?;
    Ok(())
}
