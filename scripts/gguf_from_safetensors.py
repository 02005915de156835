#!/usr/bin/env python3
"""Writes a BF16 GGUF of a Llama-shaped safetensors model (one `ollm synth` wrote), so that
llama.cpp's llama-bench can time the same shape ollm runs.

Usage: gguf_from_safetensors.py MODEL_DIR OUT.gguf [GGUF_PY_DIR]

GGUF_PY_DIR is llama.cpp's gguf-py folder (default: $GGUF_PY, else the `gguf` package).
Needs numpy. Matrices stay BF16 bytes as stored; 1-D tensors (norms) are widened to F32, as
llama.cpp's own converter does. For timing only: Q and K are not permuted into llama.cpp's
rotary layout and llama3 rope scaling is left out, so the text of a real checkpoint would be
wrong; a random-weight model has none to lose. The vocabulary is tokenizer.json's, as a gpt2
BPE vocabulary (llama-bench feeds token ids, not text).
"""

import json
import os
import struct
import sys

import numpy as np


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    model_dir, out = sys.argv[1], sys.argv[2]
    gguf_py = sys.argv[3] if len(sys.argv) > 3 else os.environ.get("GGUF_PY")
    if gguf_py:
        sys.path.insert(0, gguf_py)
    import gguf  # noqa: E402  (found through GGUF_PY_DIR)

    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    if cfg.get("model_type") != "llama":
        sys.exit(f"{model_dir}: model_type {cfg.get('model_type')!r}; this script writes Llama-shaped models only")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]

    w = gguf.GGUFWriter(out, "llama")
    w.add_name(os.path.basename(os.path.normpath(model_dir)))
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)

    tok = json.load(open(os.path.join(model_dir, "tokenizer.json")))
    vocab = dict(tok["model"]["vocab"])
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [f"<unused_{i}>" for i in range(cfg["vocab_size"])]
    for text, i in vocab.items():
        if i < len(tokens):
            tokens[i] = text
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    # llama.cpp refuses a gpt2 vocabulary without merges (a synthetic one has none): one stand-in.
    w.add_token_merges(merges or ["a b"])
    w.add_bos_token_id(cfg.get("bos_token_id") or 0)
    eos = cfg.get("eos_token_id") or 0
    w.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        sys.exit(f"{model_dir}: no .safetensors file")
    for f in files:
        path = os.path.join(model_dir, f)
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if name.startswith("model.layers."):
                layer, rest = name[len("model.layers."):].split(".", 1)
                if rest not in per_layer:
                    sys.exit(f"{path}: tensor {name} has no GGUF name here")
                new = f"blk.{layer}.{per_layer[rest]}"
            elif name in names:
                new = names[name]
            else:
                sys.exit(f"{path}: tensor {name} has no GGUF name here")
            if meta["dtype"] != "BF16":
                sys.exit(f"{path}: {name} is {meta['dtype']}; this script takes BF16 checkpoints")
            a, b = meta["data_offsets"]
            raw = data[a:b].view(np.uint16).reshape(meta["shape"])
            if raw.ndim == 1:
                w.add_tensor(new, (raw.astype(np.uint32) << 16).view(np.float32))
            else:
                w.add_tensor(new, raw, raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
