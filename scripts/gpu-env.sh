# Sourced by the GPU-machine scripts: CUDA paths, the ollm home, $OUT, the carried binary, and an
# 8B-shaped synthetic model at $m (written once per machine).
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export OLLM_HOME=${OLLM_HOME:-/tmp/ollm-home}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ollm=.carry/gpu-tests/ollm
m=${MODEL:-/tmp/m8}
if [ ! -f "$m/config.json" ]; then
  /usr/bin/time -f "synth %e s" $ollm synth --like llama-3.1-8b --out "$m" 2>&1 | tail -2
fi
