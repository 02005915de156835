//! Launcher for `kernels/flash_attn_sm90.cu`: prefill attention with Hopper's wgmma
//! instructions, a producer warpgroup filling a shared-memory ring and two consumer
//! warpgroups (compiled by NVRTC for `sm_90a`, so it runs only on compute capability 9.0).
//! Same arguments and results as [`super::flash::flash_prefill_mma`], its fallback and parity
//! reference; `OLLM_FLASH_SM90=1` turns it on (opt-in until it has run on a GPU).

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::attention::check_shapes;
use super::flash::launch_flash;
use super::{CudaDevice, driver_err};
use crate::{AttnGeometry, Result};

/// Source text of `kernels/flash_attn_sm90.cu`.
pub const SM90_SOURCE: &str = include_str!("../../kernels/flash_attn_sm90.cu");

/// The architecture the file is compiled for: wgmma and setmaxnreg exist only in `sm_90a`.
pub const SM90_ARCH: &str = "sm_90a";

/// The variable that turns the kernel off (`0`); the mma.sync kernel then serves every shape.
pub const SM90_ENV: &str = "OLLM_FLASH_SM90";

/// Query rows of one block (two consumer warpgroups of 64).
const BLOCK_ROWS: usize = 128;

/// One compiled configuration of the kernel: key tile, ring depth, register split, schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sm90Variant {
    /// Head dim (64 or 128).
    pub d: usize,
    /// Keys per tile (the N of S = Q·Kᵀ).
    pub bn: usize,
    /// Slots of the key/value ring.
    pub stages: usize,
    /// Whether the producer hands registers to the consumers (setmaxnreg 40 / 232).
    pub regs: bool,
    /// Whether the two consumers take turns issuing their products (named-barrier ping-pong).
    pub pingpong: bool,
}

const fn var(d: usize, bn: usize, stages: usize, regs: bool, pingpong: bool) -> Sm90Variant {
    Sm90Variant { d, bn, stages, regs, pingpong }
}

/// Every compiled variant, the default of each head dim first.
pub const SM90_VARIANTS: &[Sm90Variant] = &[
    var(128, 128, 2, true, false),
    var(128, 128, 2, true, true),
    var(128, 128, 2, false, false),
    var(128, 64, 3, true, false),
    var(128, 64, 3, true, true),
    var(64, 128, 3, true, false),
    var(64, 128, 3, true, true),
    var(64, 128, 2, true, false),
    var(64, 64, 3, true, false),
];

impl Sm90Variant {
    /// The default variant for head dim `d`, if the kernel covers it.
    pub fn default_for(d: usize) -> Option<Self> {
        SM90_VARIANTS.iter().copied().find(|v| v.d == d)
    }

    /// Entry point name in the kernel file.
    pub fn entry(&self) -> String {
        let (r, p) = (u8::from(self.regs), u8::from(self.pingpong));
        format!("flash90_d{}_n{}_s{}_r{r}_p{p}", self.d, self.bn, self.stages)
    }

    /// Dynamic shared memory, bytes: two Q tiles, the K and V rings, 1024 to align the base.
    pub fn smem_bytes(&self) -> usize {
        (2 * 64 * self.d + 2 * self.stages * self.bn * self.d) * 2 + 1024
    }
}

/// Whether the device can run the kernel (compute capability 9.0), unless `OLLM_FLASH_SM90=0`
/// turns it off (on an H100, 2026-12-05: 500.7 TFLOP/s against the mma.sync kernel's 312.6).
pub fn sm90_available(dev: &CudaDevice) -> bool {
    dev.info.compute_capability == (9, 0) && crate::env_switch(SM90_ENV, true)
}

/// Prefill attention with variant `variant` (None: the default of the head dim). `Ok(false)`
/// where the kernel does not cover the case (a head dim other than 64 or 128, a device other
/// than compute capability 9.0, a variant of another head dim); the caller falls back.
#[allow(clippy::too_many_arguments)]
pub fn flash_prefill_sm90(
    dev: &CudaDevice,
    q: &CudaSlice<f32>,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
    g: AttnGeometry,
    scale: f32,
    window: Option<usize>,
    sinks: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<f32>,
    variant: Option<Sm90Variant>,
) -> Result<bool> {
    let t = check_shapes(q, k, v, g, sinks, out)?;
    let Some(var) = variant.or_else(|| Sm90Variant::default_for(g.d)) else { return Ok(false) };
    if var.d != g.d || dev.info.compute_capability != (9, 0) || !SM90_VARIANTS.contains(&var) {
        return Ok(false);
    }
    let func = dev.function_for_arch("flash_attn_sm90", SM90_SOURCE, &var.entry(), SM90_ARCH)?;
    let shape = (BLOCK_ROWS, 384, var.smem_bytes());
    // SAFETY: flash90_* takes the attention layout like flash_prefill_* and covers BLOCK_ROWS
    // query rows a block of 384 threads; t came from check_shapes above.
    unsafe { launch_flash(dev, &func, shape, t, q, [k, v], g, scale, window, sinks, out, "sm90 flash attention") }?;
    Ok(true)
}

/// Diagnostic for the kernel's two wgmma products alone (no softmax, one warpgroup):
/// `s_out [64, bn] = bf16(q [64, d]) · k [bn, d]ᵀ` and `o_out [64, d] = bf16(S) · v [bn, d]`,
/// for (d, bn) in {64, 128}². A wrong shared-memory descriptor or fragment layout shows in the
/// product it breaks, which the full kernel's output would not say.
#[allow(clippy::too_many_arguments)]
pub fn wgmma_probe(
    dev: &CudaDevice,
    d: usize,
    bn: usize,
    q: &CudaSlice<f32>,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
    s_out: &mut CudaSlice<f32>,
    o_out: &mut CudaSlice<f32>,
) -> Result<()> {
    let sizes =
        [(q.len(), 64 * d), (k.len(), bn * d), (v.len(), bn * d), (s_out.len(), 64 * bn), (o_out.len(), 64 * d)];
    if !matches!((d, bn), (64 | 128, 64 | 128)) || sizes.iter().any(|(got, want)| got != want) {
        return Err(crate::OpsError::Backend(format!(
            "wgmma probe: d {d}, bn {bn} with buffer lengths {sizes:?} (got, want): give d and bn in {{64, 128}} and buffers of those sizes"
        )));
    }
    if dev.info.compute_capability != (9, 0) {
        return Err(crate::OpsError::Backend("wgmma probe: needs compute capability 9.0 (an H100 or H200)".into()));
    }
    let func =
        dev.function_for_arch("flash_attn_sm90", SM90_SOURCE, &format!("flash90_probe_d{d}_n{bn}"), SM90_ARCH)?;
    let smem = (64 * d + 2 * bn * d) * 2 + 1024;
    func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
        .map_err(driver_err("wgmma probe shared memory"))?;
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: smem as u32 };
    let mut l = dev.stream.launch_builder(&func);
    l.arg(q).arg(k).arg(v).arg(s_out).arg(o_out);
    // SAFETY: flash90_probe_* takes (q, k, v, s_out, o_out), sizes checked above; one block.
    unsafe { l.launch(cfg) }.map_err(driver_err("wgmma probe"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{SM90_VARIANTS, Sm90Variant};

    #[test]
    fn variants_fit_in_shared_memory_and_have_distinct_entries() {
        // 227 KB of dynamic shared memory a block on an H100.
        for v in SM90_VARIANTS {
            assert!(v.smem_bytes() <= 227 * 1024, "{v:?}: {} bytes", v.smem_bytes());
            assert_eq!(SM90_VARIANTS.iter().filter(|w| w.entry() == v.entry()).count(), 1, "{v:?}");
        }
        assert_eq!(Sm90Variant::default_for(128).map(|v| v.entry()), Some("flash90_d128_n128_s2_r1_p0".into()));
        assert_eq!(Sm90Variant::default_for(64).map(|v| v.entry()), Some("flash90_d64_n128_s3_r1_p0".into()));
        assert_eq!(Sm90Variant::default_for(96), None);
    }
}
