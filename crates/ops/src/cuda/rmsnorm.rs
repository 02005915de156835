//! Launcher for `kernels/rmsnorm.cu`.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{CudaDevice, CudaStorage, driver_err, shape};
use crate::{NormKind, Result};

/// The kernel file's source text.
pub const SOURCE: &str = include_str!("../../kernels/rmsnorm.cu");

/// `out = RMSNorm(x)` for `rows` rows of `n`: x, out `[rows, n]` f32 on the device, w `[n]`
/// stored as bf16, f16 or f32.
pub fn rms_norm(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    w: &CudaStorage,
    n: usize,
    eps: f32,
    kind: NormKind,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    if n == 0 || !x.len().is_multiple_of(n) || out.len() != x.len() || w.len() != n {
        return Err(shape(
            "cuda rms_norm",
            format!("x {} elements, w {}, out {}, row length {n}", x.len(), w.len(), out.len()),
        ));
    }
    let rows = (x.len() / n) as u32;
    let func = dev.function("rmsnorm", SOURCE, &format!("rmsnorm_f32_{}w", w.kernel_suffix()))?;
    let offset = if kind == NormKind::ZeroCentered { 1.0f32 } else { 0.0 };
    let n_i32 = n as i32;
    let cfg = LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut launch = dev.stream.launch_builder(&func);
    launch.arg(x);
    w.push_arg(&mut launch);
    launch.arg(out).arg(&n_i32).arg(&eps).arg(&offset);
    // SAFETY: the argument list matches the kernel signature; sizes were checked above, and the
    // kernel reads/writes `rows * n` elements of x/out and `n` of w.
    unsafe { launch.launch(cfg) }.map_err(driver_err("rms_norm"))?;
    Ok(())
}

/// Qwen3-Next gated RMSNorm: `out = (w ⊙ RMSNorm(x)) ⊙ silu(z)` for `rows` rows of `n`: x, z,
/// out `[rows, n]` f32 on the device, plain weight w `[n]` stored as bf16, f16 or f32.
pub fn gated_rms_norm(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    z: &CudaSlice<f32>,
    w: &CudaStorage,
    n: usize,
    eps: f32,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    if n == 0
        || !x.len().is_multiple_of(n)
        || z.len() != x.len()
        || out.len() != x.len()
        || w.len() != n
        || i32::try_from(n).is_err()
    {
        return Err(shape(
            "cuda gated_rms_norm",
            format!("x {} elements, z {}, w {}, out {}, row length {n}", x.len(), z.len(), w.len(), out.len()),
        ));
    }
    let rows = x.len() / n;
    if rows == 0 {
        return Ok(());
    }
    let func = dev.function("rmsnorm", SOURCE, &format!("gated_rmsnorm_f32_{}w", w.kernel_suffix()))?;
    let n_i32 = n as i32;
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut launch = dev.stream.launch_builder(&func);
    launch.arg(x).arg(z);
    w.push_arg(&mut launch);
    launch.arg(out).arg(&n_i32).arg(&eps);
    // SAFETY: the argument list matches gated_rmsnorm_f32_*w; sizes were checked above, and the
    // kernel reads `rows * n` elements of x and z, `n` of w, and writes `rows * n` of out.
    unsafe { launch.launch(cfg) }.map_err(driver_err("gated_rms_norm"))?;
    Ok(())
}
