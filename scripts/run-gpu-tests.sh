#!/usr/bin/env bash
# Runs the GPU test binaries built by scripts/build-gpu-tests.sh (on the GPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
status=0
for t in .carry/gpu-tests/*; do
  [ "$(basename "$t")" = ollm ] && continue  # the CLI binary, not a test
  echo "== $t"
  "$t" --nocapture --test-threads=1 || status=1
done
exit $status
