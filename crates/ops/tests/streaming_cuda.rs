//! The streaming primitives of the CUDA backend: pinned host buffers, copies on the copy
//! stream, and the markers that order them against compute. On a machine without a usable GPU
//! every test checks that probing fails with one clear line and prints SKIPPED, or fails under
//! `OLLM_REQUIRE_GPU` (tests/common/gpu.rs). Random data comes from a seed a failing test
//! prints (`OLLM_TEST_SEED`, tests/common/seed.rs).
//!
//! Copies are exact (raw bytes); every destination is poisoned with NaN first. The ordering
//! tests run each experiment twice: with the marker wait, where the result must be right, and
//! without it, where the result must show the other order. The second run proves that the
//! copy really overlaps compute (it ran on another stream, at the same time) and that the
//! first run's check would fail if the wait were missing. Their durations are calibrated on
//! the device (the compute lasts at least ten copies), and the tests of this file run one at
//! a time (a lock), so other tests do not disturb the timing.

#![cfg(feature = "cuda")]

mod common;

use std::sync::Mutex;
use std::time::Instant;

use common::{device, le_bytes, random, rounded};
use ollm_ops::cpu::CpuBackend;
use ollm_ops::cuda::CudaBackend;
use ollm_ops::{Compute, CopyQueue, DType, HostBuffer, HostTensor, Memory, OpsError, Tensor};

/// One test at a time: the ordering tests measure and rely on an otherwise idle device.
static GPU: Mutex<()> = Mutex::new(());

fn backend() -> Option<CudaBackend> {
    device().map(CudaBackend::new)
}

/// A device tensor of `dtype` holding `value` everywhere (NaN: poison).
fn filled(be: &CudaBackend, dtype: DType, shape: Vec<usize>, value: f32) -> Tensor {
    let n = shape.iter().product();
    be.upload(&HostTensor { dtype, shape, bytes: le_bytes(dtype, &vec![value; n]) }).expect("upload")
}

/// Orders the copy stream after everything queued on compute so far (allocations and fills of
/// new tensors), then waits for the device to be idle, so an experiment starts from rest.
fn settle(be: &CudaBackend) {
    let m = be.compute_marker().expect("compute marker");
    be.copy_wait(&m).expect("copy_wait");
    be.host_wait(&m).expect("host_wait compute");
    be.host_wait(&be.copy_marker().expect("copy marker")).expect("host_wait copy");
}

/// A pinned buffer holding `bytes` at `offset`.
fn staged(be: &CudaBackend, offset: usize, bytes: &[u8]) -> HostBuffer {
    let mut b = be.host_alloc(offset + bytes.len()).expect("host_alloc");
    b.as_mut_slice()[offset..offset + bytes.len()].copy_from_slice(bytes);
    b
}

/// Milliseconds from now until `m` has passed.
fn ms_until(be: &CudaBackend, m: ollm_ops::Marker, t: Instant) -> f64 {
    be.host_wait(&m).expect("host_wait");
    t.elapsed().as_secs_f64() * 1e3
}

#[test]
fn pinned_buffers_are_aligned_counted_apart_from_vram_and_freed() {
    let _gpu = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(be) = backend() else { return };
    let dev = be.device();
    let (vram0, pinned0) = (dev.used_bytes(), dev.pinned_bytes());
    let mut b = be.host_alloc(3 * 4096 + 1).expect("host_alloc");
    assert!(b.is_pinned());
    assert_eq!(b.len(), 4 * 4096, "rounded up to whole pages");
    assert!((b.as_slice().as_ptr() as usize).is_multiple_of(4096), "4096-aligned");
    assert!(b.as_slice().iter().all(|&x| x == 0), "starts zeroed");
    b.as_mut_slice().fill(0xAB);
    assert!(dev.pinned_bytes() >= pinned0 + b.len(), "pinned bytes are counted");
    assert!(dev.peak_pinned_bytes() >= dev.pinned_bytes());
    assert_eq!(dev.used_bytes(), vram0, "pinned bytes are not VRAM");
    drop(b);
    assert_eq!(dev.pinned_bytes(), pinned0, "dropping a buffer returns its bytes");
    let empty = be.host_alloc(0).expect("empty");
    assert!(empty.is_empty() && empty.is_pinned());
}

#[test]
fn copies_land_exactly_for_every_dtype_and_offset() {
    let _gpu = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(be) = backend() else { return };
    let n = 100_003;
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        for offset in [0, 6, 5 * 4096 + 2] {
            let v = random(n, 3.0);
            let src = staged(&be, offset, &le_bytes(dtype, &v));
            let mut t = filled(&be, dtype, vec![n], f32::NAN);
            settle(&be);
            be.copy_to_device_async(&src, offset, &mut t).expect("copy");
            be.compute_wait(&be.copy_marker().expect("marker")).expect("compute_wait");
            assert_eq!(be.to_host_f32(&t).expect("read"), rounded(&v, dtype), "{dtype} at offset {offset}");
        }
    }
    // Errors: a range past the buffer, a host tensor, a CPU backend's marker.
    let src = be.host_alloc(4096).expect("host_alloc");
    let mut t = filled(&be, DType::F32, vec![1024], 0.0);
    let e = be.copy_to_device_async(&src, 4, &mut t).expect_err("4 bytes past the end");
    assert!(matches!(e, OpsError::Shape { op: "copy_to_device_async", .. }), "{e}");
    let mut host_t = Tensor::from_f32(vec![4], vec![0.0; 4]).expect("cpu tensor");
    let e = be.copy_to_device_async(&src, 0, &mut host_t).expect_err("a CPU tensor");
    assert!(matches!(e, OpsError::WrongBackend { .. }), "{e}");
    let cpu_marker = CpuBackend::new().copy_marker().expect("cpu marker");
    assert!(matches!(be.compute_wait(&cpu_marker), Err(OpsError::WrongBackend { .. })));
    assert!(matches!(be.host_wait(&cpu_marker), Err(OpsError::WrongBackend { .. })));
    let cuda_marker = be.copy_marker().expect("cuda marker");
    assert!(matches!(CpuBackend::new().copy_wait(&cuda_marker), Err(OpsError::WrongBackend { .. })));
}

/// compute_wait(copy marker): the compute queued after it sees the whole copy. The copy is
/// 256 MiB (milliseconds), the compute right after it reads all of it at once on an idle
/// compute stream: without the wait it reads mostly poison.
#[test]
fn compute_wait_makes_a_copy_visible_to_the_following_compute() {
    let _gpu = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(be) = backend() else { return };
    let n = 64 << 20;
    let v = random(n, 1.0);
    let src = staged(&be, 0, &le_bytes(DType::F32, &v));
    // Warm up the add kernel (its first use loads the module).
    let mut w = be.zeros(vec![4]).expect("zeros");
    be.add_assign(&mut w, &filled(&be, DType::F32, vec![4], 1.0)).expect("warm-up");

    let run = |wait: bool| -> Vec<f32> {
        let mut d = filled(&be, DType::F32, vec![n], f32::NAN);
        let mut acc = be.zeros(vec![n]).expect("zeros");
        settle(&be);
        be.copy_to_device_async(&src, 0, &mut d).expect("copy");
        if wait {
            be.compute_wait(&be.copy_marker().expect("marker")).expect("compute_wait");
        }
        be.add_assign(&mut acc, &d).expect("acc += d");
        let out = be.to_host_f32(&acc).expect("read");
        // Let the copy finish before d is freed (its free is queued on the compute stream).
        be.host_wait(&be.copy_marker().expect("marker")).expect("host_wait");
        out
    };
    assert_eq!(run(true), v, "with compute_wait the compute sees every copied value");
    let poisoned = run(false).iter().filter(|x| x.is_nan()).count();
    eprintln!("without compute_wait the compute read {poisoned} of {n} values before the copy wrote them");
    assert!(poisoned > 0, "without the wait the compute still saw the whole copy: the copy did not overlap compute");
}

/// copy_wait(compute marker): a copy waits until compute has written what it overwrites. The
/// compute is a chain of large SGEMMs (at least ten copies long) ending in a write of 7.0 into
/// d; the copy of fresh data into d is queued right after. With the wait d ends with the copy's
/// data; without it the copy finishes first and the late compute write wins.
#[test]
fn copy_wait_delays_a_copy_until_compute_wrote_what_it_overwrites() {
    let _gpu = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(be) = backend() else { return };
    let (rows, cols) = (16 << 10, 4 << 10);
    let n = rows * cols;
    let v = random(n, 1.0);
    let src = staged(&be, 0, &le_bytes(DType::F32, &v));
    let sevens = filled(&be, DType::F32, vec![rows, cols], 7.0);
    let k = 4096;
    let x = be.upload_f32(vec![k, k], &random(k * k, 1.0)).expect("x");
    let w = be.upload_f32(vec![k, k], &random(k * k, 1.0)).expect("w");
    let mut y = be.zeros(vec![k, k]).expect("y");
    let mut d = filled(&be, DType::F32, vec![rows, cols], f32::NAN);

    // Calibrate: one SGEMM (after a warm-up), one copy.
    be.matmul(&x, &w, None, &mut y).expect("warm-up");
    settle(&be);
    let t = Instant::now();
    be.matmul(&x, &w, None, &mut y).expect("matmul");
    let matmul_ms = ms_until(&be, be.compute_marker().expect("marker"), t);
    let t = Instant::now();
    be.copy_to_device_async(&src, 0, &mut d).expect("copy");
    let copy_ms = ms_until(&be, be.copy_marker().expect("marker"), t);
    let reps = ((10.0 * copy_ms + 20.0) / matmul_ms.max(1e-3)).ceil().clamp(1.0, 5000.0) as usize;
    eprintln!("SGEMM {k}³: {matmul_ms:.2} ms, 256 MiB copy: {copy_ms:.2} ms; {reps} SGEMMs before the write");

    let mut run = |wait: bool| -> Vec<f32> {
        settle(&be);
        for _ in 0..reps {
            be.matmul(&x, &w, None, &mut y).expect("matmul");
        }
        be.copy_rows(&sevens, 0..rows, &mut d).expect("compute writes d");
        if wait {
            be.copy_wait(&be.compute_marker().expect("marker")).expect("copy_wait");
        }
        be.copy_to_device_async(&src, 0, &mut d).expect("copy");
        be.compute_wait(&be.copy_marker().expect("marker")).expect("compute_wait");
        be.to_host_f32(&d).expect("read")
    };
    assert_eq!(run(true), v, "with copy_wait the copy lands after the compute's write");
    let sevens_left = run(false).iter().filter(|&&x| x == 7.0).count();
    eprintln!("without copy_wait the compute's write overwrote {sevens_left} of {n} copied values");
    assert!(
        sevens_left > n / 2,
        "without the wait the copy still landed after the compute: the copy did not overlap compute"
    );
}

/// The intended use: a streamer thread queues copies into slots and waits for them on the
/// host while the main thread keeps the compute stream busy; afterwards compute sees them.
#[test]
fn a_streamer_thread_copies_while_the_main_thread_computes() {
    let _gpu = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(be) = backend() else { return };
    let (slots_n, n) = (8, 1 << 20);
    let v = random(slots_n * n, 2.0);
    let src = staged(&be, 0, &le_bytes(DType::BF16, &v));
    let mut slots: Vec<Tensor> = (0..slots_n).map(|_| filled(&be, DType::BF16, vec![n], f32::NAN)).collect();
    let k = 2048;
    let x = be.upload_f32(vec![k, k], &random(k * k, 1.0)).expect("x");
    let w = be.upload_f32(vec![k, k], &random(k * k, 1.0)).expect("w");
    let mut y = be.zeros(vec![k, k]).expect("y");
    settle(&be);
    std::thread::scope(|s| {
        let (be, src, slots) = (&be, &src, &mut slots);
        let streamer = s.spawn(move || {
            for (i, slot) in slots.iter_mut().enumerate() {
                be.copy_to_device_async(src, i * n * 2, slot).expect("copy from the streamer thread");
            }
            be.host_wait(&be.copy_marker().expect("marker")).expect("host_wait");
        });
        for _ in 0..50 {
            be.matmul(&x, &w, None, &mut y).expect("matmul on the main thread");
        }
        streamer.join().expect("streamer thread");
    });
    // The copies have passed (host_wait), so compute queued from here on sees them.
    for (i, slot) in slots.iter().enumerate() {
        let want = rounded(&v[i * n..(i + 1) * n], DType::BF16);
        assert_eq!(be.to_host_f32(slot).expect("read"), want, "slot {i}");
    }
}
