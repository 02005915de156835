#!/usr/bin/env bash
# Issue 27 point 1 on an H100, in one call: the wgmma prefill kernel (flash_attn_sm90.cu) checked
# then timed. Run after scripts/build-gpu-tests.sh, from the repository root of the GPU machine:
#   bash scripts/gpu-flash-sm90.sh 2>&1 | tee flash-sm90.log
# Each step is its own process with its own time limit, so a kernel that traps (the producer's
# mbarrier watchdog) or hangs cannot take the next steps with it; every step runs whatever the
# previous ones did, and the script's status is that of the first failure.
set -uo pipefail
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export OLLM_REQUIRE_GPU=1
t=.carry/gpu-tests
status=0
step() {  # step <seconds> <command...>
  local limit=$1; shift
  echo "== $*"
  timeout "$limit" "$@"
  local rc=$?
  echo "== rc $rc: $*"
  [ "$rc" -eq 0 ] || [ "$status" -ne 0 ] || status=$rc
}
nvidia-smi --query-gpu=name,compute_cap,driver_version,clocks.max.sm --format=csv
# 1. The file compiles for sm_90a (NVRTC of this machine) with every entry point.
step 300 "$t/kernels_compile" --nocapture
# 2. The two wgmma products alone: a wrong descriptor or fragment layout shows here first.
step 120 "$t/parity_cuda_vs_cpu" --nocapture --test-threads=1 --exact flash_sm90_wgmma_products_match_cpu
# 3. Every variant against the CPU twin and the mma.sync kernel (prints each one's errors).
step 300 "$t/parity_cuda_vs_cpu" --nocapture --test-threads=1 --exact flash_prefill_sm90_matches_cpu_and_the_mma_kernel
# 4. The whole parity suite with the wgmma kernel off (the default), then on (OLLM_FLASH_SM90=1).
step 600 "$t/parity_cuda_vs_cpu" --nocapture --test-threads=1
step 600 env OLLM_FLASH_SM90=1 "$t/parity_cuda_vs_cpu" --nocapture --test-threads=1
# 5. Speed: the backend row, then the mma.sync kernel and each wgmma variant at 32K (causal, and
#    window 4096 + sinks), each wgmma row with its difference from the mma.sync output.
step 600 env OLLM_FLASH_SM90=1 "$t/ollm" bench ops
exit "$status"
