#!/usr/bin/env bash
# Builds the GPU test binaries and the `ollm` release binary (stripped) on any machine (no CUDA
# needed: libraries load at run time) and copies them into .carry/gpu-tests/, a git-ignored
# folder to carry to the GPU machine. Then, on the GPU machine, from the repository root:
#   bash scripts/run-gpu-tests.sh            # the tests
#   .carry/gpu-tests/ollm bench ops          # GPU ops against measured peaks
set -euo pipefail
cd "$(dirname "$0")/.."
out=.carry/gpu-tests
rm -rf "$out" && mkdir -p "$out"
cargo test --release -p ollm-ops -p ollm-models -p ollm-residency --lib --tests --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("parity_cuda_vs_cpu", "streaming_cuda", "streaming", "kv_offload", "prefix_cache", "golden_logits_cuda", "golden_gpt_oss_cuda", "golden_qwen3_next_cuda", "batched_cuda", "decode_graph_cuda", "tree_cuda", "qwen3_next_placed", "sliding_window", "kernels_compile", "test_helpers", "ollm_residency"):
        print(m["executable"])
' | while read -r exe; do cp "$exe" "$out/$(basename "$exe" | sed 's/-[0-9a-f]*$//')"; done
cargo build --release -p ollm-cli --bin ollm
strip -o "$out/ollm" target/release/ollm
for f in "$out"/*; do strip "$f"; done  # debuginfo would overflow the 64 MiB carry
ls -la "$out"
