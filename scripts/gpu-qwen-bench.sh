#!/usr/bin/env bash
# The Qwen3-Next benchmark of issue 9 on the GPU machine (after scripts/build-gpu-tests.sh).
# The real model is 160 GB and the disk 64 GB, so: a Qwen3-Next-80B-shaped synthetic model of
# LAYERS layers (6 DeltaNet + 2 attention for 8), and the full 48-layer shape written as
# headers only (sparse, no disk) for `ollm plan`. The 48-layer plan under --vram-budget 8GiB
# says how many expert slots the real model gets; the LAYERS-layer runs get the same share per
# layer (--expert-slots), so the hit rate is the one 48 layers would see. Runs:
#   1. decode after a PROMPT-token prompt (50K), experts in pinned RAM;
#   2. and 3. decode after 2,048 tokens, experts in pinned RAM, then read from disk
#      (--ram-budget 0): the cost of the layers whose experts a 48-layer model keeps on disk.
# Scale: per-token(48) = 48/LAYERS × (run 1 + disk share × (run 3 − run 2)), disk share from the
# 48-layer plan's pinned-RAM layers.
set -uo pipefail
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export OLLM_HOME=${OLLM_HOME:-/tmp/ollm-home}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ollm=.carry/gpu-tests/ollm
L=${LAYERS:-8}
PROMPT=${PROMPT:-50000}
RAM=${RAM_BUDGET:-64GiB}
m=/tmp/q80-$L
full=/tmp/q80-48-headers
if [ ! -f "$m/config.json" ]; then
  /usr/bin/time -f "synth %e s" $ollm synth --like qwen3-next-80b --layers "$L" --out "$m" 2>&1 | tail -2
fi
[ -f "$full/config.json" ] || $ollm synth --like qwen3-next-80b --headers-only --out "$full"
ctx=$((PROMPT + 512))
common=(--device cuda --vram-budget 8GiB --max-context $ctx)
# The real model first: it calibrates the disk the headers-only model's plan then reuses.
$ollm plan --model "$m" "${common[@]}" --ram-budget "$RAM" 2>&1 | tee "$OUT/qwen-plan.txt"
echo "== the 48-layer shape" | tee -a "$OUT/qwen-plan.txt"
$ollm plan --model "$full" "${common[@]}" --ram-budget "$RAM" 2>&1 | tee -a "$OUT/qwen-plan.txt"
slots48=$(grep '^experts' "$OUT/qwen-plan.txt" | tail -1 | awk '{print $2}')
slots=$(( ${slots48:-0} * L / 48 ))
[ "$slots" -ge 1 ] || slots=1
echo "expert slots: 48 layers get $slots48, so $L layers get $slots" | tee -a "$OUT/qwen-plan.txt"
echo "== 1. decode after $PROMPT tokens, experts in pinned RAM"
timeout ${T1:-420} $ollm bench --model "$m" "${common[@]}" --ram-budget "$RAM" --expert-slots "$slots" \
  --prompt-tokens "$PROMPT" --tokens ${TOKENS:-16} --repeats ${REPEATS:-2} 2>&1 | tee "$OUT/qwen-50k.txt"
if [ -z "${SKIP_SHORT:-}" ]; then
  short=(--device cuda --vram-budget 8GiB --max-context 4096 --expert-slots "$slots" --prompt-tokens 2048 --tokens 8 --repeats 2)
  echo "== 2. decode after 2048 tokens, experts in pinned RAM"
  timeout 300 $ollm bench --model "$m" "${short[@]}" --ram-budget "$RAM" 2>&1 | tee "$OUT/qwen-2k-ram.txt"
  echo "== 3. decode after 2048 tokens, experts read from disk"
  timeout 300 $ollm bench --model "$m" "${short[@]}" --ram-budget 0 2>&1 | tee "$OUT/qwen-2k-disk.txt"
fi
