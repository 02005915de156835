#!/usr/bin/env python3
"""Build tiny random Llama checkpoints + fp32 reference outputs (golden fixtures for ollm).

Usage:
    python3 scripts/make_golden_llama.py [OUTDIR]      # default: fixtures/golden

Writes OUTDIR/<case>/ for case in {llama3_tied, headdim_untied}:
    config.json              llama3_tied: rewritten into the HUB-ERA spelling (top-level rope_theta +
                             rope_scaling{rope_type,...} + torch_dtype); headdim_untied: v5 spelling as
                             written by save_pretrained (rope_parameters + dtype).
    generation_config.json   bos_token_id 1, eos_token_id 2
    model.safetensors        BF16 weights (tied case has no lm_head.weight)
    tokenizer.json           byte-level BPE, 320 entries: <unk>=0 <s>=1 </s>=2, byte b -> id 3+b,
                             ids 259..319 = 61 merges (trained with BpeTrainer on a fixed text)
    tokenizer_config.json    bos "<s>", eos "</s>", unk "<unk>", ChatML-like chat_template (uses .strip())
    reference.safetensors    F32 only: logits_f32 [T,V], decode_last_logits_f32 [V], greedy_ids [16]
    reference.json           input_ids, versions, tolerance, tokenizer/chat examples, notes

Numerical recipe: docs/models.md §6.1 (norm weights 1+0.2·N, all matrices 0.1·N, seeded), cast to
bf16, save_pretrained, reload with dtype=float32 + attn_implementation="eager" on CPU -> f32 reference
computed from the exact bf16 weight values.

Pinned versions (checked at start; the script refuses to run with others unless --any-version):
    torch 2.11.0, transformers 5.17.0, tokenizers 0.23.3, safetensors 0.8.0
Deterministic: torch.manual_seed(0) for construction, torch.Generator seeds 1234 / 1235 for the noise,
the tokenizer is trained on a fixed in-file text (BpeTrainer is deterministic for a fixed input).
"""
import argparse
import copy
import json
import os
import shutil
import sys

import torch
import transformers
import tokenizers
import safetensors
from safetensors.torch import save_file, load_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors, trainers
from transformers import (LlamaConfig, LlamaForCausalLM, GenerationConfig, PreTrainedTokenizerFast,
                          AutoTokenizer)

PINNED = {"torch": "2.11.0", "transformers": "5.17.0", "tokenizers": "0.23.3", "safetensors": "0.8.0"}

VOCAB = 320
T = 24                 # prompt length
G = 16                 # greedy continuation length
SPECIALS = ["<unk>", "<s>", "</s>"]

COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    rms_norm_eps=1e-5, max_position_embeddings=256, hidden_act="silu",
    attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2, initializer_range=0.1,
)
CASES = {
    # llama3 rope with L0=64 and head_dim 16: wavelengths 2π/inv span all three bands
    # (high: λ<16, mid: 16≤λ≤64, low: λ>64).
    "llama3_tied": dict(
        seed=1234, hub_era_config=True,
        cfg=dict(COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                 rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                      low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=64)),
    ),
    # explicit head_dim 32 != hidden/heads = 16; MQA (1 kv head); untied lm_head.
    "headdim_untied": dict(
        seed=1235, hub_era_config=False,
        cfg=dict(COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                 tie_word_embeddings=False,
                 rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    ),
}

# ChatML-like template; uses Python string methods (.strip()) and the bos_token variable.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'].strip() + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TRAIN_TEXT = """\
The quick brown fox jumps over the lazy dog. Hello world! Hello there, world.
In the beginning the engine read the weights, and then it ran the model on the prompt.
A tokenizer turns text into tokens; the model turns tokens into logits; the sampler turns
logits back into tokens. This is the way of the language model, and there is no other way.
She sells sea shells on the sea shore. The shells that she sells are sea shells, for sure.
It is a truth universally acknowledged, that a single man in possession of a good fortune,
must be in want of a wife. It was the best of times, it was the worst of times.
def main():\n    print("hello world")\n    return 0\n
"""


def check_versions(allow_any):
    got = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
           "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__}
    bad = {k: v for k, v in got.items() if v != PINNED[k]}
    if bad and not allow_any:
        sys.exit(f"version mismatch {bad}, pinned {PINNED} (use --any-version to override)")
    return got


def dump_json(obj, path):
    """Pretty JSON, but lists of plain numbers on one line (id lists stay readable)."""
    def enc(o, ind):
        pad = "  " * ind
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [f'{pad}  {json.dumps(k, ensure_ascii=False)}: {enc(v, ind + 1)}' for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(o, list) and o and not all(isinstance(x, (int, float)) for x in o):
            return "[\n" + ",\n".join(f"{pad}  {enc(v, ind + 1)}" for v in o) + "\n" + pad + "]"
        return json.dumps(o, ensure_ascii=False)
    with open(path, "w", encoding="utf-8") as f:
        f.write(enc(obj, 0) + "\n")


def prompt_ids():
    return [(7 * i * i + 3 * i + 1) % VOCAB for i in range(T)]


# ----------------------------------------------------------------------------------------------------
# tokenizer
def build_tokenizer():
    """Byte-level BPE with a fixed, documented id layout:
       0..2 specials, 3+b = byte-level symbol of byte b (GPT-2 bytes_to_unicode), 259.. = merges in order."""
    # 1) learn merges with BpeTrainer (deterministic for a fixed text)
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
    t.train_from_iterator([TRAIN_TEXT], trainer=trainer)
    merges = json.loads(t.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]

    # 2) rebuild the vocab with our own order
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte2sym = {b: chr(c) for b, c in zip(bs, cs)}
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for b in range(256):
        vocab[byte2sym[b]] = 3 + b
    kept = []
    for a, b in merges:
        if len(vocab) >= VOCAB:
            break
        assert a in vocab and b in vocab, (a, b)
        if a + b in vocab:
            continue
        vocab[a + b] = len(vocab)
        kept.append((a, b))
    assert len(vocab) == VOCAB, f"only {len(vocab)} entries; lengthen TRAIN_TEXT"

    tok = Tokenizer(models.BPE(vocab=vocab, merges=kept, unk_token=None, fuse_unk=False,
                               byte_fallback=False))
    tok.add_special_tokens(SPECIALS)          # ids already in vocab -> stays 0,1,2
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    assert tok.get_vocab_size() == VOCAB
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i
    return tok


def save_tokenizer(tok, d):
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", chat_template=CHAT_TEMPLATE,
                                   model_max_length=256, clean_up_tokenization_spaces=False)
    # save_jinja_files=False keeps chat_template inside tokenizer_config.json (no chat_template.jinja)
    fast.save_pretrained(d, save_jinja_files=False)
    assert not os.path.exists(os.path.join(d, "chat_template.jinja"))
    with open(os.path.join(d, "tokenizer_config.json")) as f:
        tc = json.load(f)
    assert tc["chat_template"] == CHAT_TEMPLATE and tc["bos_token"] == "<s>" and tc["eos_token"] == "</s>"

    # sanity: reload through AutoTokenizer, round trip, every id < VOCAB
    at = AutoTokenizer.from_pretrained(d)
    ex = {}
    for text in ["Hello world", "  The quick brown fox\n\tjumps. ünïcødé 日本 🙂", "<s>x</s>"]:
        ids = at(text)["input_ids"]
        assert ids[0] == 1 and all(0 <= i < VOCAB for i in ids)
        raw = at(text, add_special_tokens=False)["input_ids"]
        assert at.decode(raw) == text, (text, at.decode(raw))
        ex[text] = {"ids_with_special": ids, "ids": raw}
    hw = tok.encode("Hello world")
    assert hw.ids[0] == 1 and tok.decode(hw.ids, skip_special_tokens=True) == "Hello world"
    msgs = [{"role": "user", "content": "  Hello there!  "}]
    rendered = at.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == "<s><|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\n", rendered
    chat = {"messages": msgs, "add_generation_prompt": True, "rendered": rendered,
            "ids": at(rendered, add_special_tokens=False)["input_ids"]}
    return [{"text": k, **v} for k, v in ex.items()], chat


# ----------------------------------------------------------------------------------------------------
# model
def perturb_(model, gen):
    """docs/models.md §6.1 (Llama subset): norm weights 1+0.2·N, everything else (matrices) 0.1·N."""
    with torch.no_grad():
        for name, p in model.named_parameters():      # tied lm_head is deduplicated here
            z = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * z)
            else:
                assert p.dim() == 2, name
                p.copy_(0.1 * z)
        if model.config.tie_word_embeddings:
            model.tie_weights()


def hub_era_config(d):
    """Rewrite v5 config.json (rope_parameters, dtype) into the hub-era spelling, same values."""
    p = os.path.join(d, "config.json")
    with open(p) as f:
        c = json.load(f)
    rp = c.pop("rope_parameters")
    out = {}
    for k, v in c.items():
        if k == "dtype":
            out["torch_dtype"] = v
        else:
            out[k] = v
    out["rope_theta"] = rp["rope_theta"]
    out["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    assert "rope_type" in out["rope_scaling"]
    with open(p, "w") as f:
        json.dump(out, f, indent=2, sort_keys=True)
        f.write("\n")
    return rp


def load_f32(d):
    return LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()


def references(m, ids):
    x = torch.tensor([ids])
    with torch.no_grad():
        full = m(x, use_cache=False).logits[0].float()
        c = m(x[:, :-1], use_cache=True)
        dec = m(x[:, -1:], past_key_values=c.past_key_values, use_cache=True).logits[0, -1].float()
        # EOS is *disabled* (not suppressed): eos_token_id=None in an explicit GenerationConfig, so a
        # generated id 2 would be kept and generation would go on; all G tokens are pure argmax.
        gc = GenerationConfig(do_sample=False, max_new_tokens=G, eos_token_id=None, bos_token_id=1,
                              pad_token_id=0)
        gen = m.generate(x, generation_config=gc)[0, T:].tolist()
        # independent check: plain argmax loop without cache
        cur = list(ids)
        for _ in range(G):
            cur.append(int(m(torch.tensor([cur]), use_cache=False).logits[0, -1].argmax()))
    assert len(gen) == G and cur[T:] == gen, (gen, cur[T:])
    return full, dec, gen


def build_case(name, spec, outroot, tok):
    d = os.path.join(outroot, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    cfg = LlamaConfig(**copy.deepcopy(spec["cfg"]))
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    perturb_(model, torch.Generator().manual_seed(spec["seed"]))
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2)
    model.to(torch.bfloat16).save_pretrained(d)          # model.safetensors (bf16), config.json, gen cfg

    ids = prompt_ids()
    m = load_f32(d)
    full, dec, gen = references(m, ids)
    dd = (dec - full[-1]).abs().max().item()
    print(f"[{name}] logits std {full.std():.3f}  |decode-full| {dd:.2e}  greedy {gen}")
    assert dd < 1e-4

    note = ("f32 reference: bf16 weights loaded with dtype=float32, attn_implementation='eager', CPU. "
            "logits_f32 = full forward on input_ids (no BOS added); decode_last_logits_f32 = prefill "
            f"input_ids[:-1] with use_cache=True then decode input_ids[-1]; greedy_ids = {G} argmax tokens "
            "after input_ids (generate do_sample=False, eos_token_id=None so EOS does not stop it; "
            "checked against a cache-free argmax loop), stored as F32 values.")
    if spec["hub_era_config"]:
        rp = hub_era_config(d)
        m2 = load_f32(d)
        assert dict(m2.config.rope_parameters) == rp, (m2.config.rope_parameters, rp)
        full2, dec2, gen2 = references(m2, ids)
        diff = max((full2 - full).abs().max().item(), (dec2 - dec).abs().max().item())
        print(f"[{name}] hub-era config reload: max |Δ| vs v5 config = {diff:.3e}, greedy same {gen2 == gen}")
        assert diff == 0.0 and gen2 == gen
        note += (" config.json was rewritten from the v5 spelling (rope_parameters, dtype) into the "
                 "hub-era spelling (rope_theta + rope_scaling, torch_dtype) with the same values; "
                 "transformers reloads it to bit-identical logits.")
    else:
        note += " config.json is the v5 spelling written by save_pretrained (rope_parameters, dtype)."

    # tied checkpoint must not contain lm_head.weight
    keys = set(load_file(os.path.join(d, "model.safetensors")).keys())
    assert ("lm_head.weight" in keys) == (not cfg.tie_word_embeddings), keys

    save_file({"logits_f32": full.contiguous(), "decode_last_logits_f32": dec.contiguous(),
               "greedy_ids": torch.tensor(gen, dtype=torch.float32)},
              os.path.join(d, "reference.safetensors"),
              # one key only: safetensors writes metadata from a hash map, so >1 key is unordered
              metadata={"generator": "scripts/make_golden_llama.py (versions in reference.json)"})
    tok_examples, chat = save_tokenizer(tok, d)
    ref = {"input_ids": ids, "generator": "scripts/make_golden_llama.py",
           "transformers": transformers.__version__, "torch": torch.__version__,
           "tolerance_abs": 1e-4, "greedy_ids": gen, "note": note,
           "tokenizer_examples": tok_examples, "chat_example": chat}
    dump_json(ref, os.path.join(d, "reference.json"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", nargs="?", default=os.path.join(os.path.dirname(__file__), "..",
                                                              "fixtures", "golden"))
    ap.add_argument("--any-version", action="store_true")
    a = ap.parse_args()
    check_versions(a.any_version)
    torch.set_num_threads(1)
    tok = build_tokenizer()
    for name, spec in CASES.items():
        build_case(name, spec, a.outdir, tok)


if __name__ == "__main__":
    main()
