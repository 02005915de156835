#!/usr/bin/env python3
"""Compare ollm's GGUF dequantisation with gguf-py's, type by type.

Usage:
    # 1. random blocks of every type ollm dequantises -> a small GGUF
    python3 scripts/check_gguf_dequant.py make /tmp/rand.gguf
    # 2. dump it (or any GGUF) with ollm
    cargo run --release -p ollm-weights --example gguf_to_f32 -- /tmp/rand.gguf /tmp/rand_f32
    # 3. compare every tensor with gguf.quants.dequantize; prints max |diff| per ggml type
    python3 scripts/check_gguf_dequant.py compare /tmp/rand.gguf /tmp/rand_f32

Random blocks are uniform random bytes, with every f16 scale field overwritten by a finite value in
[-0.1, 0.1] (random bytes would give NaN/Inf scales, which compare badly). Seeded: numpy seed 0.
Written against gguf-py 0.19 (pip install gguf==0.19.0).
"""
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

# Byte offsets of the f16 scale fields inside one block, per type.
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
ROWS, BLOCKS_PER_ROW = 4, 3


def make(path: str) -> None:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    for qtype, fields in F16_FIELDS.items():
        block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(ROWS * BLOCKS_PER_ROW, block_bytes), dtype=np.uint8)
        for off in fields:
            scales = rng.uniform(-0.1, 0.1, size=raw.shape[0]).astype(np.float16)
            raw[:, off:off + 2] = scales.view(np.uint8).reshape(-1, 2)
        raw = raw.reshape(ROWS, BLOCKS_PER_ROW * block_bytes)
        w.add_tensor(qtype.name, raw, raw_shape=raw.shape, raw_dtype=qtype)
    n = 4 * 96
    x = rng.standard_normal(n).astype(np.float32)
    w.add_tensor("F32", x.reshape(4, 96))
    w.add_tensor("F16", x.astype(np.float16).reshape(4, 96))
    bf16 = gguf.quants.quantize(x.reshape(4, 96), T.BF16)
    w.add_tensor("BF16", bf16, raw_shape=bf16.shape, raw_dtype=T.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {path}")


def compare(path: str, dump_dir: str) -> None:
    r = gguf.GGUFReader(path)
    worst: dict[str, float] = {}
    counts: dict[str, int] = {}
    for t in r.tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        ours = np.fromfile(Path(dump_dir) / f"{t.name}.f32", dtype="<f4")
        assert ours.shape == ref.shape, (t.name, ours.shape, ref.shape)
        name = t.tensor_type.name
        diff = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
        worst[name] = max(worst.get(name, 0.0), diff)
        counts[name] = counts.get(name, 0) + 1
    for name in sorted(worst):
        print(f"{name:6s} tensors {counts[name]:4d}  max |ours - gguf-py| = {worst[name]:.3g}")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "make":
        make(sys.argv[2])
    elif len(sys.argv) >= 4 and sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
