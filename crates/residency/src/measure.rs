//! The bandwidths `ollm plan` and `ollm bench` compare against, measured through a backend's
//! roles: memory bandwidth (the bound of decoding) and host-to-device copies (the bound of
//! streaming from the RAM tier). Each is the best of 5 timed runs (the copies after one
//! untimed warm-up; the host read's buffer has just been written), the host read the best of
//! [`HOST_READ_RUNS`]: on a shared 2-core machine one run in a few is disturbed by the neighbours
//! (best of 5 moved between 37 and 63 GB/s across rounds), and the best is the machine's rate.
//!
//! * Memory bandwidth: on the host ([`MemoryKind::Host`]) a multithreaded streaming read of a
//!   buffer far larger than the caches; on a device a device-to-device copy on the compute
//!   queue ([`Compute::copy_rows`](ollm_ops::Compute::copy_rows)), bytes read + written.
//! * Host to device: copies from a [`Memory::host_alloc`](ollm_ops::Memory::host_alloc)
//!   buffer (page-locked on a device) into a U8 tensor through the
//!   [`CopyQueue`](ollm_ops::CopyQueue), each waited for on the host.
//!
//! Timing is the host clock around work that starts from an idle queue and ends with a
//! host wait; a run moves at least 1 MiB (hundreds of MiB in practice), so the few microseconds
//! of a marker are noise.

use std::time::Instant;

use ollm_ops::{Backend, DType, MemoryKind};
use rayon::prelude::*;

/// Timed runs after the warm-up; the best is reported.
const RUNS: usize = 5;
/// Timed runs of the host read (see the module doc).
pub const HOST_READ_RUNS: usize = 12;

/// How many runs [`memory_bandwidth`] takes the best of on `be`.
pub fn bandwidth_runs(be: &dyn Backend) -> usize {
    match be.memory_kind() {
        MemoryKind::Host => HOST_READ_RUNS,
        MemoryKind::Device => RUNS,
    }
}

/// Best-of-[`bandwidth_runs`] memory bandwidth in bytes/s over a buffer of about `bytes`.
pub fn memory_bandwidth(be: &dyn Backend, bytes: usize) -> ollm_ops::Result<f64> {
    match be.memory_kind() {
        MemoryKind::Host => host_read_bandwidth(be, bytes),
        MemoryKind::Device => device_copy_bandwidth(be, bytes),
    }
}

/// Best-of-[`HOST_READ_RUNS`] read bandwidth in bytes/s over a [`HostReader`] of about `bytes`.
fn host_read_bandwidth(be: &dyn Backend, bytes: usize) -> ollm_ops::Result<f64> {
    let reader = HostReader::new(be, bytes)?;
    Ok((0..HOST_READ_RUNS).map(|_| reader.read().rate()).fold(0.0, f64::max))
}

/// A streaming read of host memory, repeatable: every thread of the pool decode runs on sums one
/// contiguous share of a buffer of about `bytes` (at least 256 KiB), allocated as the backend
/// allocates tensors (on the CPU: huge pages, as the weights decode streams). `ollm bench`
/// interleaves reads with decode steps, so both see the same moments of a shared machine.
pub struct HostReader {
    buf: Vec<f32>,
}

/// What one [`HostReader::read`] moved and how long it took.
#[derive(Debug, Clone, Copy, Default)]
pub struct Read {
    pub bytes: usize,
    pub secs: f64,
}

impl Read {
    /// Bytes per second.
    pub fn rate(&self) -> f64 {
        self.bytes as f64 / self.secs.max(1e-9)
    }
}

impl HostReader {
    /// A written buffer of about `bytes` on a host backend.
    pub fn new(be: &dyn Backend, bytes: usize) -> ollm_ops::Result<HostReader> {
        let n = (bytes / 4).max(1 << 16);
        let mut t = be.alloc(vec![n], DType::F32)?;
        let mut buf = match t.storage_mut() {
            ollm_ops::Storage::Cpu(ollm_ops::CpuStorage::F32(v)) => std::mem::take(v),
            _ => {
                return Err(ollm_ops::OpsError::Backend(
                    "host read bandwidth: the backend gave no host f32 buffer".into(),
                ));
            }
        };
        buf.par_iter_mut().enumerate().for_each(|(i, x)| *x = (i % 7) as f32);
        Ok(HostReader { buf })
    }

    /// One timed read of the whole buffer.
    pub fn read(&self) -> Read {
        let buf = &self.buf;
        let share = buf.len().div_ceil(rayon::current_num_threads());
        let t = Instant::now();
        let s: f32 = buf.par_chunks(share).map(lane_sum).sum();
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        Read { bytes: buf.len() * 4, secs }
    }
}

/// Sum with 16 independent accumulators, so the loop vectorises and memory, not the adder
/// chain, is the limit.
fn lane_sum(c: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    for w in c.chunks_exact(16) {
        for i in 0..16 {
            acc[i] += w[i];
        }
    }
    acc.iter().sum()
}

/// Best-of-5 rate of a device-to-device copy of `bytes / 2` (at least 4 MiB), counting the
/// bytes read and written.
fn device_copy_bandwidth(be: &dyn Backend, bytes: usize) -> ollm_ops::Result<f64> {
    let n = (bytes / 8).max(1 << 20);
    let src = be.zeros(vec![1, n])?;
    let mut dst = be.zeros(vec![1, n])?;
    let mut best = 0.0f64;
    for i in 0..=RUNS {
        be.host_wait(&be.compute_marker()?)?;
        let t = Instant::now();
        be.copy_rows(&src, 0..1, &mut dst)?;
        be.host_wait(&be.compute_marker()?)?;
        if i > 0 {
            best = best.max((2 * n * 4) as f64 / t.elapsed().as_secs_f64());
        }
    }
    Ok(best)
}

/// Best-of-5 host-to-device copy rate in bytes/s from a host buffer of about `bytes` (at least
/// 1 MiB) into a tensor of the same size. On the CPU backend this is a multithreaded memcpy.
pub fn host_to_device_bandwidth(be: &dyn Backend, bytes: usize) -> ollm_ops::Result<f64> {
    let mut src = be.host_alloc(bytes.max(1 << 20))?;
    // Written, so that no page is the shared zero page a read would not really fetch.
    src.as_mut_slice().par_chunks_mut(1 << 20).for_each(|c| c.iter_mut().enumerate().for_each(|(i, x)| *x = i as u8));
    let n = src.len();
    let mut dst = be.alloc(vec![n], DType::U8)?;
    // The destination was allocated (and zeroed) on the compute queue.
    be.copy_wait(&be.compute_marker()?)?;
    let mut timed = || -> ollm_ops::Result<f64> {
        let mut best = 0.0f64;
        for i in 0..=RUNS {
            let t = Instant::now();
            be.copy_to_device_async(&src, 0, &mut dst)?;
            be.host_wait(&be.copy_marker()?)?;
            let secs = t.elapsed().as_secs_f64();
            if i > 0 {
                best = best.max(n as f64 / secs.max(1e-9));
            }
        }
        Ok(best)
    };
    let best = timed();
    // After an error a copy may still be queued; dst is freed on the compute queue, so let the
    // copy finish first.
    be.host_wait(&be.copy_marker()?)?;
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use ollm_ops::Memory;
    use ollm_ops::cpu::CpuBackend;

    #[test]
    fn host_rates_are_positive() {
        let be = CpuBackend::new();
        let read = memory_bandwidth(&be, 4 << 20).expect("read bandwidth");
        let copy = host_to_device_bandwidth(&be, 4 << 20).expect("copy rate");
        for rate in [read, copy] {
            assert!(rate.is_finite() && rate > 0.0, "{rate}");
        }
    }

    /// On a GPU: the memory figures are the VRAM account's, pinned copies are measured, and the
    /// test buffer is freed (its pinned bytes returned). Skipped, saying so, without a usable
    /// GPU (a failure under OLLM_REQUIRE_GPU=1).
    #[test]
    fn host_to_device_bandwidth_is_measured_on_a_gpu() {
        let dev = match ollm_ops::cuda::probe(0) {
            Ok(d) => d,
            // The gate of the GPU test binaries (crates/ops/tests/common/gpu.rs), for a unit test.
            Err(e) if std::env::var_os("OLLM_REQUIRE_GPU").is_some_and(|v| !v.is_empty() && v != "0") => {
                panic!("OLLM_REQUIRE_GPU is set but there is no usable CUDA device: {e}")
            }
            Err(e) => {
                eprintln!("SKIPPED: host_to_device_bandwidth_is_measured_on_a_gpu: no usable CUDA device ({e})");
                return;
            }
        };
        let be = ollm_ops::cuda::CudaBackend::new(dev);
        let s = be.memory_stats();
        assert!(s.budget_bytes.is_some() && s.budget_bytes == s.total_bytes, "default budget: the device: {s:?}");
        assert!(s.in_use_bytes >= 4 << 20, "the cuBLAS workspace is counted: {s:?}");
        assert!(s.peak_bytes.is_some_and(|p| p >= s.overhead_bytes), "the peak counts the context: {s:?}");
        let pinned0 = s.pinned_bytes;
        let rate = host_to_device_bandwidth(&be, 256 << 20).expect("measure");
        eprintln!("pinned host-to-device: {:.1} GB/s on {}", rate / 1e9, be.name());
        assert!(rate.is_finite() && rate > 0.0, "{rate}");
        assert_eq!(be.memory_stats().pinned_bytes, pinned0, "the test buffer is freed");
        let hbm = memory_bandwidth(&be, 256 << 20).expect("device copy");
        assert!(hbm.is_finite() && hbm > 0.0, "{hbm}");
    }
}
