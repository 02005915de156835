#!/usr/bin/env bash
# The GPT-OSS benchmark of issue 8 on the GPU machine (after scripts/build-gpu-tests.sh): a
# GPT-OSS-20B-shaped synthetic model with MXFP4 experts (written once per machine), a
# 10,240-token prompt under --vram-budget 8GiB. Prints prefill and decode against their bounds
# (attention weights and routed experts over the measured tier bandwidths), the expert cache's
# hit rate per window, and the peak VRAM; then the same with the experts read from disk.
set -uo pipefail
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export OLLM_HOME=${OLLM_HOME:-/tmp/ollm-home}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ollm=.carry/gpu-tests/ollm
m=${MOE_MODEL:-/tmp/oss20}
if [ ! -f "$m/config.json" ]; then
  /usr/bin/time -f "synth %e s" $ollm synth --like gpt-oss-20b --out "$m" 2>&1 | tail -2
fi
# MOE_EXTRA_ARGS: more bench flags, e.g. MOE_EXTRA_ARGS=--expert-prefetch (issue 27 point 4).
args=(--model "$m" --device cuda --vram-budget 8GiB --prompt-tokens ${PROMPT:-10240} ${MOE_EXTRA_ARGS:-})
if [ -z "${MOE_DISK_ONLY:-}" ]; then
  echo "== experts in pinned RAM"
  timeout ${MOE_TIMEOUT:-300} $ollm bench "${args[@]}" --ram-budget 64GiB --tokens ${TOKENS:-16} \
    --repeats ${REPEATS:-3} 2>&1 | tee "$OUT/moe-ram.txt"
fi
if [ -n "${MOE_DISK:-}" ]; then
  echo "== experts read from disk (--ram-budget 0)"
  timeout ${MOE_TIMEOUT:-300} $ollm bench "${args[@]}" --ram-budget 0 --tokens 4 --repeats 1 2>&1 | tee "$OUT/moe-disk.txt"
fi
