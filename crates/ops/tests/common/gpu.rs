//! The gate every GPU test passes first. Without a usable device (or NVRTC) the test prints
//! one `SKIPPED: <test>: <what is missing> (<reason>)` line and returns, so CPU machines stay
//! green; with `OLLM_REQUIRE_GPU` set (to anything but empty or `0`) it panics instead, naming
//! what is missing, so a GPU machine with a broken driver cannot pass by skipping.
//! `scripts/run-gpu-tests.sh` sets it. ollm-models's tests include this file by path.

use ollm_ops::cuda::{CudaDevice, probe};

/// Set on a machine that must run the GPU tests (the GPU runner): a skip becomes a failure.
pub const REQUIRE_GPU: &str = "OLLM_REQUIRE_GPU";

/// Whether `OLLM_REQUIRE_GPU` asks for a GPU (set, and neither empty nor `0`).
pub fn gpu_required() -> bool {
    std::env::var_os(REQUIRE_GPU).is_some_and(|v| !v.is_empty() && v != "0")
}

/// The running test's name (libtest names each test's thread after it).
pub fn test_name() -> String {
    std::thread::current().name().unwrap_or("this test").to_owned()
}

/// CUDA device 0, or None after one SKIPPED line; under `OLLM_REQUIRE_GPU` a panic naming what
/// is missing (driver library, NVRTC, cuBLAS, the device itself). Either way the probe's error
/// must be one line that names the fix.
pub fn gpu_or_skip() -> Option<CudaDevice> {
    match probe(0) {
        Ok(d) => Some(d),
        Err(e) => {
            let reason = e.to_string();
            assert!(
                !reason.contains('\n') && reason.contains("--device cpu"),
                "probe's error is not one line: {reason}"
            );
            skip_or_fail("no usable CUDA device", &reason);
            None
        }
    }
}

/// Says that `missing` keeps the running test from running: one SKIPPED line, or, under
/// `OLLM_REQUIRE_GPU`, a one-line panic.
pub fn skip_or_fail(missing: &str, reason: &str) {
    let test = test_name();
    assert!(!reason.contains('\n'), "{test}: the reason for skipping is not one line: {reason}");
    if gpu_required() {
        panic!("{REQUIRE_GPU} is set, so {test} fails instead of skipping: {missing} ({reason})");
    }
    eprintln!("SKIPPED: {test}: {missing} ({reason})");
}
