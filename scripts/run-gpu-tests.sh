#!/usr/bin/env bash
# Runs the GPU test binaries built by scripts/build-gpu-tests.sh (on the GPU machine), with
# OLLM_REQUIRE_GPU=1: a test that finds no usable device (driver, NVRTC, cuBLAS) fails, naming
# what is missing, instead of skipping. Fails when any binary fails, and, belt and braces, when
# any binary printed a SKIPPED line. Logs go to .carry/gpu-tests/logs/.
set -uo pipefail
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export OLLM_REQUIRE_GPU=1
dir=.carry/gpu-tests
logs=$dir/logs
mkdir -p "$logs"
failed=() skipped=() ran=0
for t in "$dir"/*; do
  [ -f "$t" ] && [ -x "$t" ] || continue
  name=$(basename "$t")
  [ "$name" = ollm ] && continue  # the CLI binary, not a test
  ran=$((ran + 1))
  echo "== $t"
  "$t" --nocapture --test-threads=1 2>&1 | tee "$logs/$name.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("$name")
  grep -q 'SKIPPED' "$logs/$name.log" && skipped+=("$name")
done
[ "$ran" -gt 0 ] || { echo "FAILED: no test binaries in $dir (run scripts/build-gpu-tests.sh first)"; exit 1; }
echo "== $ran test binaries run (a failing test that drew random inputs printed OLLM_TEST_SEED=<seed>: set it to reproduce)"
[ ${#failed[@]} -eq 0 ] || echo "FAILED: ${failed[*]}"
[ ${#skipped[@]} -eq 0 ] || echo "FAILED: printed SKIPPED (a GPU test did not run): ${skipped[*]}"
[ ${#failed[@]} -eq 0 ] && [ ${#skipped[@]} -eq 0 ]
