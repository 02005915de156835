#!/usr/bin/env bash
# `ollm logits --device cuda` and `ollm run --device cuda` on every golden Llama fixture, against
# the fp32 transformers reference (fixtures/golden/*/reference.safetensors). Run on the GPU
# machine after scripts/build-gpu-tests.sh, carrying .carry/gpu-tests.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
OLLM=${OLLM:-.carry/gpu-tests/ollm}
status=0
for dir in fixtures/golden/*/; do
  name=$(basename "$dir")
  python3 -c "import json,sys; print(' '.join(map(str, json.load(open('$dir/reference.json'))['input_ids'])))" > /tmp/$name.tokens
  "$OLLM" logits -m "$dir" --tokens-file /tmp/$name.tokens --out /tmp/$name.npy --device cuda || { status=1; continue; }
  python3 - "$dir" /tmp/$name.npy <<'PY' || status=1
import sys, numpy as np
from safetensors.numpy import load_file
ref = load_file(sys.argv[1] + "/reference.safetensors")["logits_f32"]
got = np.load(sys.argv[2])
d = float(np.abs(got - ref).max())
same_argmax = int((got.argmax(-1) == ref.argmax(-1)).sum())
print(f"{sys.argv[1]}: ollm logits --device cuda: max |Δ| = {d:.2e} (tolerance 5e-2), argmax equal at {same_argmax}/{len(ref)} positions")
sys.exit(0 if d < 5e-2 else 1)
PY
  "$OLLM" run -m "$dir" --device cuda --temperature 0 -n 8 --prompt "Hello" > /tmp/$name.out 2> /tmp/$name.err || { status=1; cat /tmp/$name.err; }
  echo "$name: ollm run --device cuda: $(tail -1 /tmp/$name.err)"
done
exit $status
