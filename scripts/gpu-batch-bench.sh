#!/usr/bin/env bash
# Issue 26 on the GPU machine (after scripts/build-gpu-tests.sh): batched and speculative decode
# in the offload regime, each figure against its bound measured in the same run. Two parts, so
# each fits one 10-minute device call (the machine stays warm ~30 s between calls):
#   PART=a  the RAM tier: Llama-3.1-8B-shaped (`ollm synth`), --vram-budget 8GiB --ram-budget 64GiB,
#           2,048-token prompts, batch 1, 4, 16, 64; the cost of a verification pass of k = 1…256
#           tokens; a draft model (`synth --like llama-3.2-1b`) resident beside the streamed target
#   PART=b  the disk tier (--ram-budget 0) at batch 1 and 64, and GPT-OSS-20B-shaped at batch 1
#           and 16 (experts moved once per step: bytes per generated token, hit rate)
# Logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu-env.sh
common=(--model "$m" --device cuda --vram-budget 8GiB --prompt-tokens 2048)
case "${PART:-a}" in
a)
  echo "== RAM tier: batched decode"
  timeout 300 $ollm bench "${common[@]}" --ram-budget 64GiB --batch 1,4,16,64 --requests 0 --tokens 8 \
    --step-tokens 16384 2>&1 | tee "$OUT/batch-ram.txt"
  echo "== RAM tier: verification pass cost"
  timeout 120 $ollm bench "${common[@]}" --ram-budget 64GiB --pass-cost 1,4,16,64,256 --repeats 3 2>&1 \
    | tee "$OUT/pass-ram.txt"
  if [ -n "${DRAFT:-}" ]; then
    d=/tmp/d1
    [ -f "$d/config.json" ] || $ollm synth --like llama-3.2-1b --out "$d" 2>&1 | tail -1
    echo "== RAM tier: a resident draft model beside the streamed target"
    timeout 120 $ollm bench "${common[@]}" --ram-budget 64GiB --speculate "draft:$d" --draft-tokens 8 --tokens 16 \
      --repeats 1 2>&1 | tee "$OUT/draft-ram.txt"
  fi
  ;;
b)
  echo "== disk tier: batched decode"
  timeout 420 $ollm bench "${common[@]}" --ram-budget 0 --batch 1,64 --requests 0 --tokens 3 \
    --step-tokens 16384 2>&1 | tee "$OUT/batch-disk.txt"
  echo "== disk tier: verification pass cost"
  timeout 150 $ollm bench "${common[@]}" --ram-budget 0 --pass-cost 1,64,256 --repeats 1 2>&1 \
    | tee "$OUT/pass-disk.txt"
  ;;
c)
  o=/tmp/oss20
  [ -f "$o/config.json" ] || /usr/bin/time -f "synth %e s" $ollm synth --like gpt-oss-20b --out "$o" 2>&1 | tail -2
  echo "== GPT-OSS-20B shape: experts per step at batch 1 and 16"
  timeout 300 $ollm bench --model "$o" --device cuda --vram-budget 8GiB --ram-budget 64GiB --prompt-tokens 512 \
    --batch 1,16 --requests 0 --tokens 8 --step-tokens 16384 2>&1 | tee "$OUT/batch-oss.txt"
  ;;
esac
