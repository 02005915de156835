#!/usr/bin/env bash
# Weight-streaming benchmarks of issue 5 on the GPU machine (after scripts/build-gpu-tests.sh):
# a Llama-3.1-8B-shaped synthetic model under an 8 GiB VRAM budget, an 8K-token prompt, decode
# with every non-resident layer in pinned RAM and then with all of them read from disk, each
# against bounds measured in the same run; a packed copy against the shards. Logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export OLLM_HOME=${OLLM_HOME:-/tmp/ollm-home}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ollm=.carry/gpu-tests/ollm
m=${MODEL:-/tmp/m8}
if [ ! -f "$m/config.json" ]; then
  /usr/bin/time -f "synth %e s" $ollm synth --like llama-3.1-8b --out "$m" 2>&1 | tail -2
fi
common=(--model "$m" --device cuda --vram-budget 8GiB)
echo "== RAM tier"
timeout 240 $ollm bench "${common[@]}" --ram-budget 64GiB --prompt-tokens 8192 --tokens 8 --repeats 3 2>&1 | tee "$OUT/bench-ram.txt"
echo "== disk tier"
timeout 300 $ollm bench "${common[@]}" --ram-budget 0 --prompt-tokens 8192 --tokens 2 --repeats 3 --pack-layers 4 2>&1 | tee "$OUT/bench-disk.txt"
