#!/usr/bin/env bash
# GPT-OSS's harmony format end to end on the GPU machine (after scripts/build-gpu-tests.sh): a
# GPT-OSS-20B-shaped synthetic model with the real o200k_harmony tokenizer (built from
# .carry/o200k_base.tiktoken, OpenAI's vocabulary; .ci/run shows where to get it) and the
# official chat template, through `ollm run --chat`, `ollm chat` and `ollm serve` under
# --vram-budget 8GiB. Random weights write random tokens, so the answers are noise; what this
# checks is that prompts encode, render and run, and that the server answers in the OpenAI
# shape (with reasoning_content when the model writes an analysis channel).
set -uo pipefail
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export OLLM_HOME=${OLLM_HOME:-/tmp/ollm-home}
ollm=.carry/gpu-tests/ollm
m=${HARMONY_MODEL:-/tmp/oss20-o200k}
args=(--model "$m" --device cuda --vram-budget 8GiB)
if [ ! -f "$m/config.json" ]; then
  $ollm synth --like gpt-oss-20b --out "$m" --tiktoken .carry/o200k_base.tiktoken 2>&1 | tail -2
fi
echo "== run --chat"
$ollm run "${args[@]}" --chat --prompt "What is the capital of France? Answer in one word." -n 80 --temperature 0 --stats 2>&1 \
  | grep -vE "^\[ollm\] token"
echo "== chat (two turns on stdin)"
printf 'Hello there, who are you?\nAnd what did I just ask?\n/exit\n' | $ollm chat "${args[@]}" -n 80 --temperature 0
echo "== serve"
$ollm serve "${args[@]}" --port 8123 > /tmp/serve.log 2>&1 &
pid=$!
for _ in $(seq 1 120); do curl -sf localhost:8123/health > /dev/null && break; sleep 1; done
curl -s localhost:8123/v1/chat/completions -H 'content-type: application/json' \
  -d '{"model":"oss20-o200k","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Say hi."}],"max_tokens":80,"temperature":0}'
echo
curl -sN localhost:8123/v1/chat/completions -H 'content-type: application/json' \
  -d '{"model":"oss20-o200k","messages":[{"role":"user","content":"Count to three."}],"max_tokens":70,"stream":true}' | tail -3
kill $pid; wait $pid 2>/dev/null
tail -3 /tmp/serve.log
