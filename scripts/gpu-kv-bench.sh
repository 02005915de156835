#!/usr/bin/env bash
# The KV-store benchmark of issue 6 on the GPU machine (after scripts/build-gpu-tests.sh): a
# Llama-3.1-8B-shaped synthetic model under an 8 GiB VRAM budget, a 100K-token prompt (the KV
# cache, 12.5 GiB, lives off the device), then decode against the bound measured in the run.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu-env.sh
echo "== 100K prompt, KV off the device, layers and KV in pinned RAM"
timeout ${KV_TIMEOUT:-420} $ollm bench --model "$m" --device cuda --vram-budget 8GiB --ram-budget 64GiB \
  --prompt-tokens ${PROMPT:-102400} --tokens ${TOKENS:-4} --repeats 2 2>&1 | tee "$OUT/bench-kv.txt"
