#!/usr/bin/env bash
# Weight-streaming benchmarks of issue 5 on the GPU machine (after scripts/build-gpu-tests.sh):
# a Llama-3.1-8B-shaped synthetic model under an 8 GiB VRAM budget, an 8K-token prompt, decode
# with every non-resident layer in pinned RAM and then with all of them read from disk, each
# against bounds measured in the same run. Logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu-env.sh
common=(--model "$m" --device cuda --vram-budget 8GiB)
echo "== RAM tier"
timeout 240 $ollm bench "${common[@]}" --ram-budget 64GiB --prompt-tokens 8192 --tokens 8 --repeats 3 2>&1 | tee "$OUT/bench-ram.txt"
echo "== disk tier"
timeout 300 $ollm bench "${common[@]}" --ram-budget 0 --prompt-tokens 8192 --tokens 2 --repeats 3 2>&1 | tee "$OUT/bench-disk.txt"
