#!/usr/bin/env bash
# Issue 27 in one GPU call (written 2026-12-05 when the GPU loan ended before any run): checks
# then measures every kernel of the issue, each new path switched on by its variable and the
# measured default beside it. Build first, on any machine: `bash scripts/build-gpu-tests.sh`,
# then carry .carry/gpu-tests (xz it if it passes 64 MiB with the tree). On the H100, from the
# repository root:  OUT=/tmp/out bash scripts/gpu-issue27.sh
# Steps are separate processes with their own limits, so a kernel that traps cannot take the
# rest with it. A SmolLM2-shaped model is written by transformers from fixtures' config (random
# weights: decode speed does not depend on them); the 8B and MoE shapes by `ollm synth`.
set -uo pipefail
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} OLLM_HOME=${OLLM_HOME:-/tmp/ollm-home}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
t=.carry/gpu-tests o=.carry/gpu-tests/ollm
step() { local limit=$1; shift; echo "== $(date +%T) $*"; timeout "$limit" "$@"; echo "== rc $?"; }
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader
# 1. Correctness: the wgmma products, every sm90 variant, then the suite with every new path on.
step 120 env OLLM_REQUIRE_GPU=1 $t/parity_cuda_vs_cpu --nocapture --test-threads=1 --exact flash_sm90_wgmma_products_match_cpu
step 300 env OLLM_REQUIRE_GPU=1 $t/parity_cuda_vs_cpu --nocapture --test-threads=1 --exact flash_prefill_sm90_matches_cpu_and_the_mma_kernel
step 900 env OLLM_FLASH_SM90=1 OLLM_CUDA_FUSED=1 OLLM_CUDA_GRAPHS=1 OLLM_MOE_GROUPED=1 bash scripts/run-gpu-tests.sh
step 300 env OLLM_REQUIRE_GPU=1 OLLM_CUDA_PDL=1 OLLM_CUDA_FUSED=1 $t/decode_graph_cuda --nocapture --test-threads=1
# 2. Point 1 and the grouped MoE rows: bench ops (old kernel, each wgmma variant, grouped vs loop).
step 600 env OLLM_FLASH_SM90=1 $o bench ops | tee "$OUT/bench-ops.txt"
# 3. Point 2: decode, SmolLM2 shape and 8B shape, as measured before / fused / + graphs / + PDL.
if [ ! -f /tmp/smol/model.safetensors ]; then
  python3 - <<'PY'
import shutil, torch
from transformers import AutoConfig, AutoModelForCausalLM
src = "fixtures/smollm2-shape"
m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), torch_dtype=torch.bfloat16)
m.save_pretrained("/tmp/smol")
for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
    shutil.copy(f"{src}/{f}", f"/tmp/smol/{f}")
PY
fi
[ -f /tmp/l8b/config.json ] || step 300 $o synth --like llama-3.1-8b --out /tmp/l8b
for m in /tmp/smol /tmp/l8b; do
  for v in "" "OLLM_CUDA_FUSED=1" "OLLM_CUDA_FUSED=1 OLLM_CUDA_GRAPHS=1" "OLLM_CUDA_FUSED=1 OLLM_CUDA_GRAPHS=1 OLLM_CUDA_PDL=1"; do
    echo "== $m ${v:-measured default}"
    step 240 env $v $o bench --model $m --device cuda --tokens 128 2>&1 | tail -5
  done
done | tee "$OUT/decode.txt"
# 4. Points 3 and 4: GPT-OSS-20B shape, 10K prefill and decode with experts in pinned RAM, the
#    default, then grouped prefill with decode prefetch; Qwen3-Next 8 layers grouped.
bash scripts/gpu-moe-bench.sh 2>&1 | tee "$OUT/moe-default.txt"
OLLM_MOE_GROUPED=1 MOE_EXTRA_ARGS=--expert-prefetch bash scripts/gpu-moe-bench.sh 2>&1 | tee "$OUT/moe-grouped.txt"
OLLM_MOE_GROUPED=1 SKIP_SHORT=1 bash scripts/gpu-qwen-bench.sh 2>&1 | tee "$OUT/qwen-grouped.txt"
