#!/usr/bin/env bash
# Speculative decoding (prompt lookup) against plain greedy decoding on this machine's CPU, with
# the demo model SmolLM2-135M-Instruct (provisioned into ~/.cache/ollm on first use), on the two
# long-document tasks in fixtures/speculative (a 1,268-word document, then a question whose answer
# quotes it, or a request for a summary). Each window answers twice in the same process, plain then
# speculative, and checks that the tokens are the same.
#
# Usage: scripts/bench_speculative.sh [OLLM_BINARY] [TOKENS] [REPEATS]
#   OLLM_BINARY  default target/release/ollm (cargo build --release -p ollm-cli)
set -euo pipefail
cd "$(dirname "$0")/.."
ollm=${1:-target/release/ollm}
tokens=${2:-128}
repeats=${3:-3}
echo "# $(date -u +%Y-%m-%d) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) threads"
for task in question summary; do
  for k in auto 4 8; do
    echo "## $task, --speculate ngram --draft-tokens $k"
    "$ollm" bench --model smollm2-135m --device cpu --speculate ngram --draft-tokens "$k" \
      --prompt-file "fixtures/speculative/$task.txt" --chat --tokens "$tokens" --repeats "$repeats" 2>/dev/null
  done
done
