#!/usr/bin/env bash
# The prefix-cache benchmark of issue 6 on the GPU machine (after scripts/build-gpu-tests.sh): a
# Llama-3.1-8B-shaped synthetic model under an 8 GiB VRAM budget, a 102,400-token document and a
# 200-token question. The cold run computes everything and stores the document's KV blocks; the
# second run asks another question of the same document and loads them. Each prints its time to
# first token, the load against a direct read of the entries, and decode against its bound; the
# second run then asks a third question in the same process (the document stays in memory).
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu-env.sh
pc=${PREFIX_DIR:-/tmp/prefix-cache}
rm -rf "$pc"
args=(--model "$m" --device cuda --vram-budget 8GiB --ram-budget 64GiB --prompt-tokens ${PROMPT:-102400}
  --question-tokens 200 --tokens ${TOKENS:-32} --repeats 1 --prefix-cache "$pc")
echo "== cold: document + question 1, stores the document"
timeout ${KV_TIMEOUT:-400} $ollm bench "${args[@]}" --question-seed 1 2>&1 | tee "$OUT/prefix-cold.txt"
du -sh "$pc"
echo "== warm: document + question 2, loads the document"
timeout ${KV_TIMEOUT:-400} $ollm bench "${args[@]}" --question-seed 2 --questions 2 2>&1 | tee "$OUT/prefix-warm.txt"
rm -rf "$pc"
