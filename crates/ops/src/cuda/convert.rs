//! Launcher for `kernels/convert.cu`: f32 activations narrowed to bf16 or f16 for cuBLAS.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{CudaDevice, driver_err, grid_stride, shape};
use crate::{DType, OpsError, Result};

/// The kernel file's source text.
pub const SOURCE: &str = include_str!("../../kernels/convert.cu");

/// `y[i] = to(x[i])` for every element of x, rounded to nearest even; `to` is bf16 or f16, and y
/// (the raw 16-bit patterns) holds at least x.len() elements.
pub fn f32_to_16bit(dev: &CudaDevice, x: &CudaSlice<f32>, y: &mut CudaSlice<u16>, to: DType) -> Result<()> {
    let func = match to {
        DType::BF16 => "f32_to_bf16",
        DType::F16 => "f32_to_f16",
        DType::F32 | DType::U8 => {
            return Err(OpsError::DType { op: "cuda convert", dtype: to, detail: "narrowing targets bf16 or f16" });
        }
    };
    if y.len() < x.len() {
        return Err(shape("cuda convert", format!("x {}, y {}", x.len(), y.len())));
    }
    let func = dev.function("convert", SOURCE, func)?;
    let n = x.len() as i64;
    let mut l = dev.stream.launch_builder(&func);
    l.arg(x).arg(y).arg(&n);
    // SAFETY: y holds at least n elements (checked above).
    unsafe { l.launch(grid_stride(x.len())) }.map_err(driver_err("convert"))?;
    Ok(())
}
