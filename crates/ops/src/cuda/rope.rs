//! Launcher for `kernels/rope.cu`.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::graph::Limit;
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
