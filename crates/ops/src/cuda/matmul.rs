//! Launcher for `kernels/matmul.cu`.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::{CudaDevice, driver_err, shape};
use crate::Result;

const SOURCE: &str = include_str!("../../kernels/matmul.cu");

/// `out = x · wᵀ`; x `[t, k]` f32, w `[n, k]` bf16, out `[t, n]` f32.
pub fn matmul(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    w: &CudaSlice<bf16>,
    n: usize,
    k: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let t = x.len().checked_div(k).unwrap_or(0);
    if k == 0 || x.len() != t * k || w.len() != n * k || out.len() != t * n {
        return Err(shape("cuda matmul", format!("x {}, w {} ([{n}, {k}]), out {}", x.len(), w.len(), out.len())));
    }
    let func = dev.function("matmul", SOURCE, "matmul_f32_bf16w")?;
    let (n_i32, k_i32) = (n as i32, k as i32);
    let cfg =
        LaunchConfig { grid_dim: (n.div_ceil(8) as u32, t as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut l = dev.stream.launch_builder(&func);
    l.arg(x).arg(w).arg(out).arg(&n_i32).arg(&k_i32);
    // SAFETY: sizes checked above; each warp writes one element of out.
    unsafe { l.launch(cfg) }.map_err(driver_err("matmul"))?;
    Ok(())
}
