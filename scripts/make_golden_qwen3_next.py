#!/usr/bin/env python3
"""Build tiny random Qwen3-Next checkpoints (Qwen3NextForCausalLM) + fp32 reference outputs (golden fixtures).

Usage:
    python3 scripts/make_golden_qwen3_next.py [OUTDIR]    # default: fixtures/golden

Writes OUTDIR/<case>/ for case in {qwen3_next, qwen3_next_mlp_only}:
    config.json              v5 spelling written by save_pretrained (rope_parameters{rope_type:default, rope_theta,
                             partial_rotary_factor} + a duplicate top-level partial_rotary_factor, dtype, explicit
                             layer_types = [linear, linear, linear, full], mlp_only_layers)
    generation_config.json   bos_token_id 1, eos_token_id 2
    model.safetensors        BF16 only, hub naming (save_pretrained reverts HF's in-memory fused experts):
                               linear layers  linear_attn.{in_proj_qkvz, in_proj_ba, out_proj}.weight, conv1d.weight
                                              [C,1,Kc], dt_bias [Nv], A_log [Nv], norm.weight [dv]
                               full layer     self_attn.{q_proj [nh*2d,H] (per head [q|gate]), k_proj, v_proj, o_proj,
                                              q_norm [d], k_norm [d]}.weight
                               MoE layers     mlp.gate.weight [E,H], mlp.experts.{e}.{gate,up,down}_proj.weight,
                                              mlp.shared_expert.{gate,up,down}_proj.weight, mlp.shared_expert_gate [1,H]
                               dense layers   mlp.{gate,up,down}_proj.weight (qwen3_next_mlp_only, layer 1)
                             The exact name -> [dtype, shape] table is checked against the config and written to
                             reference.json ("model_tensors").
    reference.safetensors    F32 only (T = 150 prompt tokens, P = 100 prefill tokens, V = 320):
                               logits_f32 [T,V]                 whole prompt in ONE forward (use_cache=False): HF's
                                                                chunked gated-delta-rule (chunks of 64 -> 3 chunks)
                               hidden_f32_{0..L} [T,H]          HF output_hidden_states (last = after the final norm)
                               last_layer_out_f32 [T,H]         output of layer L-1 before the final norm
                               stepwise_logits_f32 [T-P,V]      prefill input_ids[:P] with the cache, then input_ids[P:]
                                                                one token at a time (recurrent form); row i = position P+i
                               continued_prefill_logits_f32 [T-P,V]  prefill input_ids[:P], then input_ids[P:] in ONE
                                                                cached call (chunked form starting from the cached
                                                                state and the cached conv inputs)
                               decode_last_logits_f32 [V]       prefill the whole prompt with the cache, then ONE decode
                                                                step of greedy_ids[0]: the logits at position T
                               conv_state_after_prefill_f32_{l} [C_conv,Kc]  HF's conv cache of linear layer l after
                                                                the P-token prefill (last Kc pre-conv inputs, [Q|K|V]
                                                                channel order, column Kc-1 = newest)
                               recurrent_state_after_prefill_f32_{l} [Nv,dk,dv]  HF's delta-rule state S after it
                               greedy_ids [G]                   8 greedy ids (stored as F32 values)
                               logits_bf16 [T,V]                HF's bf16 run (dtype=bfloat16), informational only
                               logits_f64ref [T,V]              HF's float64 run, rounded to f32, informational only
    reference.json           input_ids, greedy_ids, versions, config summary, chunked-vs-recurrent |Δ|, router top-k
                             margins (+ near-ties), seed search, DeltaNet decay statistics, HF cache layout, notes

No tokenizer is written (the model tests feed ids directly).

What the fixtures exercise: the layer mix from layer_types (3 Gated DeltaNet layers + 1 gated full-attention layer),
GQA (nh 4 / nkv 2), head_dim 32 != H/nh with partial RoPE (R = 8, theta 1e7), r = Nv/Nk = 2 value heads per key
head, the [Q|K|V] conv channel order, a prompt of 150 > 2*64 tokens (the chunked prefill runs 3 chunks; the
stepwise positions 100..149 lie on both sides of the chunk boundary at 128), MoE with shared expert (E 8, k 2,
norm_topk_prob), and (qwen3_next_mlp_only) one dense MLP layer with intermediate_size.

Numerical recipe: docs/models.md §6.1, Qwen3-Next variant:
    zero-centred norms (input/post-attention/final, q_norm, k_norm; applied as 1+w)   0.2·N
    linear_attn.norm.weight (Gated-RMS, plain w)                                       1+0.2·N
    linear_attn.dt_bias                                                                1+0.5·N
    linear_attn.A_log      log of a log-spaced ladder A = 0.005 .. 1 over the Nv heads, permuted per layer
                           (torch.randperm with the same generator), times exp(0.1·N) jitter: every layer has a
                           long-memory head (state survives a 64-token chunk) and a fast-forgetting one.
                           (§6.1 says log U(0.01,4); with only 4 heads per layer that rarely gives a head whose
                           state survives a chunk, and then the inter-chunk path would be numerically invisible.)
    linear_attn.conv1d.weight                                                          0.5·N (so every tap and the
                           SiLU after the conv matter; 0.1·N would make the conv nearly linear and tiny)
    mlp.gate.weight (router)                                                           0.3·N (router logits
                           std ~2.4 instead of ~0.8: with 0.1·N the minimum top-k margin over 158 tokens x 4 layers
                           is typically ~5e-4, below what a fixture should rely on)
    every other matrix (embeddings, projections, experts, shared expert + gate, lm_head)     0.1·N
The noise is drawn from torch.Generator(seed) in named_parameters() order (HF's in-memory fused expert tensors
mlp.experts.gate_up_proj [E,2Ie,H] / down_proj [E,H,Ie]). The model is cast to bf16 and saved with save_pretrained;
the f32 reference is then computed on CPU with attn_implementation="eager", experts_implementation="eager" from
from_pretrained(dtype=float32), i.e. from exactly the bf16 values.

Kernel path: HF uses flash-linear-attention / causal-conv1d when importable (docs/models.md §4.8). The script records
whether `fla` / `causal_conv1d` / `kernels` are importable and checks (closure inspection of HF's wrappers) that
torch_chunk_gated_delta_rule, torch_recurrent_gated_delta_rule, causal_conv1d_fn and causal_conv1d_update resolve
to HF's own torch functions; it stops otherwise.

Router margins: for every token and MoE layer, the gap between the k-th and (k+1)-th largest f32 router logit
(softmax is monotonic, so this orders experts exactly like the probabilities; the probability gap is recorded too),
over the prompt and over prompt + greedy continuation. Seeds PARAM_SEED, PARAM_SEED+1, ... are tried in order and
the first one is kept whose minimum router logit margin AND minimum greedy top-1/top-2 logit gap both exceed
MIN_MARGIN (2e-3), whose greedy continuation does not contain eos_token_id (2), so that an engine that stops at
EOS still produces all G ids, and whose f32 noise is small (below): the seeds tried and their numbers are written
to reference.json.

f32 noise (conditioning): Qwen3-Next's Gated-RMSNorm normalises every (token, value head) row of the delta-rule
output over only dv = 16 values; rows whose rms is ~1e-4 (vs a median ~3e-2; typically a fast-forgetting head where
q_t·k_t is nearly 0) are amplified up to 1/sqrt(eps) times, and with them the f32 rounding error of o = Sᵀq (which
cancels there). With the release eps 1e-6 and A up to 4, HF's own f32 logits differ from an f64 run of the same weights
by 2e-5 .. 3e-4 depending on the seed, and an independent f32 implementation (scripts/refcheck/spec_impl.py) by
up to 6e-5 even at eps 1e-5, which would make a 1e-4 engine tolerance meaningless. Hence rms_norm_eps = 1e-4
(amplification <= 100x; an engine that hard-codes 1e-6 instead of reading the config still fails on those rows) and
A <= 1: over seeds 1234..1240 both HF f32 and spec_impl f32 then stay within 1.1e-5 .. 2.5e-5 of f64. The seed search
also requires max |Δlogit| < COND_MAX (3e-5) for: HF f32 (chunked) vs HF f64; the stepwise, continued-prefill and
token-by-token-from-position-0 (recurrent) paths vs HF f64 and vs the chunked f32 logits. logits_f64ref is stored for
information.

Pinned versions (checked at start; the script refuses to run with others unless --any-version):
    torch 2.11.0, transformers 5.17.0, safetensors 0.8.0
Deterministic: torch.manual_seed(0) for construction, torch.Generator(seed) for the noise, CPU,
torch.set_num_threads(1).
"""
import argparse
import copy
import importlib.util
import json
import math
import os
import shutil
import sys

import torch
import torch.nn.functional as F
import transformers
import safetensors
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import GenerationConfig, Qwen3NextConfig, Qwen3NextForCausalLM
from transformers.models.qwen3_next import modeling_qwen3_next as hf_q3n

PINNED = {"torch": "2.11.0", "transformers": "5.17.0", "safetensors": "0.8.0"}

VOCAB = 320
T = 150                # prompt length (> 2 chunks of 64)
P = 100                # prefill length for the stepwise (recurrent) path; positions P..T-1 are decoded one by one
G = 8                  # greedy continuation length
CHUNK = 64             # HF torch_chunk_gated_delta_rule default chunk_size (not a config key)
PARAM_SEED = 1234      # first noise seed tried
MAX_SEED_TRIES = 32
MIN_MARGIN = 2e-3      # required min router logit margin and min greedy top-1/top-2 logit gap (f32)
COND_MAX = 3e-5        # required max |Δlogit| of HF f32 (chunked, recurrent, continued) against HF f64
NEAR_TIE = 1e-2        # router margins below this are listed in reference.json
TOL_ABS = 1e-4

BASE_CFG = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4,
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    # gated full attention: nh·d = 128 != H = 64, R = int(32·0.25) = 8 rotary dims
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, attention_bias=False,
    rope_parameters=dict(rope_type="default", rope_theta=10000000.0, partial_rotary_factor=0.25),
    partial_rotary_factor=0.25,
    # Gated DeltaNet: Nk 2, Nv 4 (r = 2), dk = dv = 16, Kc 4 -> C_conv = 2·32 + 64 = 128
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    # MoE with shared expert
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], intermediate_size=96,
    rms_norm_eps=1e-4, hidden_act="silu",   # not the release 1e-6: see 'f32 noise' in the docstring
    max_position_embeddings=256, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, initializer_range=0.1,
)

CASES = {
    "qwen3_next": {},
    # layer 1 (a linear-attention layer) gets a dense MLP with intermediate_size instead of the MoE block
    "qwen3_next_mlp_only": dict(mlp_only_layers=[1]),
}

A_LADDER = (0.005, 1.0)   # A = exp(A_log) range over the Nv heads of a layer (log-spaced, permuted)


def check_versions(allow_any):
    got = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
           "safetensors": safetensors.__version__}
    bad = {k: v for k, v in got.items() if v != PINNED[k]}
    if bad and not allow_any:
        sys.exit(f"version mismatch {bad}, pinned {PINNED} (use --any-version to override)")
    return got


def check_kernel_path():
    """HF must run its own torch reference functions (not fla / causal_conv1d / hub kernels)."""
    from transformers.integrations import hub_kernels
    from transformers.utils import import_utils

    def installed(mod):
        # a real package (has an origin); scripts/kernels/ next to this script is a namespace dir, not the package
        spec = importlib.util.find_spec(mod)
        return spec is not None and spec.origin is not None

    found = {m: installed(m) for m in ("fla", "causal_conv1d", "kernels")}
    found["transformers_is_kernels_available"] = bool(import_utils.is_kernels_available())
    found["transformers_hub_kernels_enabled"] = bool(getattr(hub_kernels, "_kernels_enabled", False))
    funcs = {}
    for n in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn",
              "causal_conv1d_update"):
        f = getattr(hf_q3n, n)
        cells = dict(zip(f.__code__.co_freevars, [c.cell_contents for c in (f.__closure__ or ())]))
        impl, torch_fn = cells.get("implementation"), cells.get("torch_function")
        ok = impl is not None and impl is torch_fn and getattr(impl, "__module__", "") == hf_q3n.__name__
        funcs[n] = "torch reference (" + hf_q3n.__name__ + ")" if ok else repr(impl)
        if not ok:
            sys.exit(f"{n} does not resolve to HF's torch reference path ({impl!r}); importable: {found}")
    fwd = hf_q3n.Qwen3NextRMSNormGated.forward
    funcs["Qwen3NextRMSNormGated.forward"] = fwd.__module__
    if fwd.__module__ != hf_q3n.__name__ or found["transformers_hub_kernels_enabled"]:
        sys.exit(f"hub kernels may replace HF's torch modules: {found}, RMSNormGated.forward from {fwd.__module__}")
    return {"importable": found, "functions": funcs}


def dump_json(obj, path):
    """Pretty JSON, but lists of plain numbers/strings on one line (id lists stay readable)."""
    def enc(o, ind):
        pad = "  " * ind
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [f'{pad}  {json.dumps(k, ensure_ascii=False)}: {enc(v, ind + 1)}' for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(o, list) and o and not all(isinstance(x, (int, float, str)) for x in o):
            return "[\n" + ",\n".join(f"{pad}  {enc(v, ind + 1)}" for v in o) + "\n" + pad + "]"
        return json.dumps(o, ensure_ascii=False)
    with open(path, "w", encoding="utf-8") as f:
        f.write(enc(obj, 0) + "\n")


def prompt_ids():
    return [(7 * i * i + 3 * i + 1) % VOCAB for i in range(T)]


def fresh_dir(d):
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)


def tensor_table(path):
    """name -> [dtype, shape] as stored in a safetensors file (header order is sorted by name)."""
    out = {}
    with safe_open(path, framework="pt") as f:
        for k in sorted(f.keys()):
            sl = f.get_slice(k)
            out[k] = [sl.get_dtype(), list(sl.get_shape())]
    return out


def is_moe_layer(cfg, l):
    return l not in cfg.mlp_only_layers and cfg.num_experts > 0 and (l + 1) % cfg.decoder_sparse_step == 0


def expected_tensors(cfg):
    """docs/models.md §4.2 hub naming, name -> [dtype, shape], derived from the config alone."""
    H, V, E = cfg.hidden_size, cfg.vocab_size, cfg.num_experts
    nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    Nk, Nv, dk, dv, Kc = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                          cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim)
    Dk, Dv = Nk * dk, Nv * dv
    Ie, Is, I = cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size, cfg.intermediate_size
    ex = {"model.embed_tokens.weight": [V, H], "model.norm.weight": [H], "lm_head.weight": [V, H]}
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}."
        ex[p + "input_layernorm.weight"] = [H]
        ex[p + "post_attention_layernorm.weight"] = [H]
        if cfg.layer_types[l] == "full_attention":
            ex.update({p + "self_attn.q_proj.weight": [nh * 2 * d, H], p + "self_attn.k_proj.weight": [nkv * d, H],
                       p + "self_attn.v_proj.weight": [nkv * d, H], p + "self_attn.o_proj.weight": [H, nh * d],
                       p + "self_attn.q_norm.weight": [d], p + "self_attn.k_norm.weight": [d]})
        else:
            a = p + "linear_attn."
            ex.update({a + "in_proj_qkvz.weight": [2 * Dk + 2 * Dv, H], a + "in_proj_ba.weight": [2 * Nv, H],
                       a + "conv1d.weight": [2 * Dk + Dv, 1, Kc], a + "dt_bias": [Nv], a + "A_log": [Nv],
                       a + "norm.weight": [dv], a + "out_proj.weight": [H, Dv]})
        if is_moe_layer(cfg, l):
            m = p + "mlp."
            ex[m + "gate.weight"] = [E, H]
            for e in range(E):
                ex.update({f"{m}experts.{e}.gate_proj.weight": [Ie, H], f"{m}experts.{e}.up_proj.weight": [Ie, H],
                           f"{m}experts.{e}.down_proj.weight": [H, Ie]})
            ex.update({m + "shared_expert.gate_proj.weight": [Is, H], m + "shared_expert.up_proj.weight": [Is, H],
                       m + "shared_expert.down_proj.weight": [H, Is], m + "shared_expert_gate.weight": [1, H]})
        else:
            ex.update({p + "mlp.gate_proj.weight": [I, H], p + "mlp.up_proj.weight": [I, H],
                       p + "mlp.down_proj.weight": [H, I]})
    return {k: ["BF16", v] for k, v in sorted(ex.items())}


# ----------------------------------------------------------------------------------------------------
# parameters
def perturb_(model, gen):
    """The Qwen3-Next variant of docs/models.md §6.1 (see the module docstring). Every parameter is overwritten."""
    counts = {}
    lo, hi = math.log(A_LADDER[0]), math.log(A_LADDER[1])
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("linear_attn.norm.weight"):
                rule, v = "gated-rms norm 1+0.2N", 1.0 + 0.2 * z
            elif name.endswith("norm.weight"):               # input/post-attention/final norms, q_norm, k_norm
                rule, v = "zero-centred norm 0.2N", 0.2 * z
            elif name.endswith("linear_attn.dt_bias"):
                rule, v = "dt_bias 1+0.5N", 1.0 + 0.5 * z
            elif name.endswith("linear_attn.A_log"):
                n = p.numel()
                perm = torch.randperm(n, generator=gen)
                ladder = torch.linspace(lo, hi, n)[perm]
                rule, v = "A_log ladder", ladder + 0.1 * z
            elif name.endswith("linear_attn.conv1d.weight"):
                rule, v = "conv1d 0.5N", 0.5 * z
            elif name.endswith("mlp.gate.weight"):
                rule, v = "router 0.3N", 0.3 * z
            else:
                assert p.dim() >= 2, name
                rule, v = "matrix 0.1N", 0.1 * z
            p.copy_(v)
            counts[rule] = counts.get(rule, 0) + 1
    return counts


# ----------------------------------------------------------------------------------------------------
# loading and probing
def load(d, dtype):
    m, info = Qwen3NextForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="eager",
                                                   experts_implementation="eager", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return m.eval()


class Probe:
    """Forward hooks: router logits / chosen experts per MoE layer (appended per call), last layer output."""

    def __init__(self, m):
        self.router = {}            # layer -> list of [tokens, E] f32 router logits
        self.chosen = {}            # layer -> list of [tokens, k] expert ids
        self.last_out = None
        self.handles = []
        layers = m.model.layers
        for l, layer in enumerate(layers):
            if isinstance(layer.mlp, hf_q3n.Qwen3NextSparseMoeBlock):
                self.handles.append(layer.mlp.gate.register_forward_hook(self._router_hook(l)))
        self.handles.append(layers[-1].register_forward_hook(self._last_hook))

    def _router_hook(self, l):
        def f(mod, inp, out):
            logits, _, idx = out
            self.router.setdefault(l, []).append(logits.detach().float().clone())
            self.chosen.setdefault(l, []).append(idx.detach().clone())
        return f

    def _last_hook(self, mod, inp, out):
        h = out[0] if isinstance(out, tuple) else out
        self.last_out = h.detach().float().clone()

    def logits(self):
        return {l: torch.cat(v, 0) for l, v in sorted(self.router.items())}

    def experts(self):
        return {l: torch.cat(v, 0) for l, v in sorted(self.chosen.items())}

    def remove(self):
        for h in self.handles:
            h.remove()


def router_margins(router, k):
    """per layer: f32 logit gap and probability gap between the k-th and (k+1)-th largest expert, per token."""
    out = {}
    for l, r in router.items():
        s = r.sort(dim=-1, descending=True).values
        ps = r.softmax(-1).sort(dim=-1, descending=True).values
        out[l] = {"logit_gap": s[:, k - 1] - s[:, k], "prob_gap": ps[:, k - 1] - ps[:, k]}
    return out


def deltanet_stats(m, hidden):
    """Per linear layer and value head: beta range, mean g, and the log-decay sum(g) over each 64-token chunk of the
    prompt (how much of the state entering a chunk survives it). Recomputed from HF's own modules."""
    out = {}
    for l, layer in enumerate(m.model.layers):
        if layer.block_type != "linear_attention":
            continue
        la = layer.linear_attn
        a_in = layer.input_layernorm(hidden[l][None])
        _, _, _, _, b, a = la.fix_query_key_value_ordering(la.in_proj_qkvz(a_in), la.in_proj_ba(a_in))
        beta = b[0].sigmoid()
        g = -la.A_log.float().exp() * F.softplus(a[0].float() + la.dt_bias)        # [T, Nv]
        chunks = [g[i:i + CHUNK].sum(0) for i in range(0, g.shape[0], CHUNK)]
        out[str(l)] = {
            "A": [round(float(v), 5) for v in la.A_log.float().exp()],
            "dt_bias": [round(float(v), 4) for v in la.dt_bias.float()],
            "beta_min_max": [round(float(beta.min()), 4), round(float(beta.max()), 4)],
            "g_mean_per_head": [round(float(v), 5) for v in g.mean(0)],
            "log_decay_per_chunk_per_head": [[round(float(v), 3) for v in c] for c in chunks],
            "note": f"log_decay_per_chunk_per_head[c][n] = sum of g over prompt tokens {CHUNK}c .. "
                    f"min({CHUNK}c+{CHUNK},T)-1 (the last chunk is partial); exp of it is the fraction of the state "
                    "entering chunk c that survives it",
        }
    return out


def check_split_and_cache(m, hidden, cache):
    """docs/models.md §4.5 projection split + [Q|K|V] conv order, written out independently, against HF's
    fix_query_key_value_ordering; and HF's conv cache after the P-token prefill = the last Kc pre-conv inputs.
    hidden: the layer inputs of that same prefill call ([P,H] each)."""
    cfg = m.config
    Nk, Nv, dk, dv, Kc = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                          cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim)
    r = Nv // Nk
    facts = {}
    for l, layer in enumerate(m.model.layers):
        if layer.block_type != "linear_attention":
            continue
        la = layer.linear_attn
        a_in = layer.input_layernorm(hidden[l][None, :P])
        Pq = la.in_proj_qkvz(a_in)[0].view(P, Nk, 2 * dk + 2 * r * dv)
        Qb = la.in_proj_ba(a_in)[0].view(P, Nk, 2 * r)
        q, k = Pq[..., :dk].reshape(P, Nk * dk), Pq[..., dk:2 * dk].reshape(P, Nk * dk)
        v = Pq[..., 2 * dk:2 * dk + r * dv].reshape(P, Nv * dv)
        z = Pq[..., 2 * dk + r * dv:].reshape(P, Nv, dv)
        b, a = Qb[..., :r].reshape(P, Nv), Qb[..., r:].reshape(P, Nv)
        hq, hk, hv, hz, hb, ha = la.fix_query_key_value_ordering(la.in_proj_qkvz(a_in), la.in_proj_ba(a_in))
        same = all(torch.equal(x, y) for x, y in ((q, hq[0].reshape(P, -1)), (k, hk[0].reshape(P, -1)),
                                                  (v, hv[0].reshape(P, -1)), (z, hz[0]), (b, hb[0]), (a, ha[0])))
        assert same, f"layer {l}: docs/models.md §4.5 split differs from HF"
        u = torch.cat([q, k, v], -1)                                   # [P, C_conv] pre-conv inputs, [Q|K|V]
        conv = cache.layers[l].conv_states[0][0]                       # [C_conv, Kc]
        rec = cache.layers[l].recurrent_states[0][0]                   # [Nv, dk, dv]
        assert conv.shape == (2 * Nk * dk + Nv * dv, Kc) and rec.shape == (Nv, dk, dv), (conv.shape, rec.shape)
        assert torch.equal(conv, u[P - Kc:].T), f"layer {l}: conv cache is not the last Kc pre-conv inputs"
        facts[str(l)] = {"conv_state_shape": list(conv.shape), "conv_state_dtype": str(conv.dtype),
                         "recurrent_state_shape": list(rec.shape), "recurrent_state_dtype": str(rec.dtype)}
    return facts


def references(m, ids):
    """All f32 reference outputs of one model (already f32, eval, CPU)."""
    cfg = m.config
    k, L = cfg.num_experts_per_tok, cfg.num_hidden_layers
    x = torch.tensor([ids])
    with torch.no_grad():
        probe = Probe(m)
        o = m(x, use_cache=False, output_hidden_states=True)
        probe.remove()
        full = o.logits[0].float()
        hidden = [h[0].float() for h in o.hidden_states]
        assert len(hidden) == L + 1
        last_out = probe.last_out[0]
        # HF overwrites hidden_states[-1] with the final-norm output; the raw last layer output is hooked.
        assert torch.equal(hidden[L], m.model.norm(probe.last_out)[0].float())
        full_experts = probe.experts()

        # P-token prefill (chunked), then tokens P..T-1 one at a time (recurrent form), router hooked
        c = m(x[:, :P], use_cache=True, output_hidden_states=True)
        prefill = c.logits[0].float()
        cache = c.past_key_values
        conv_states = {l: cache.layers[l].conv_states[0][0].clone() for l in range(L)
                       if cfg.layer_types[l] == "linear_attention"}
        rec_states = {l: cache.layers[l].recurrent_states[0][0].clone() for l in range(L)
                      if cfg.layer_types[l] == "linear_attention"}
        layout = check_split_and_cache(m, [h[0] for h in c.hidden_states], cache)
        probe = Probe(m)
        steps = []
        for t in range(P, T):
            s = m(x[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = s.past_key_values
            steps.append(s.logits[0, -1].float())
        probe.remove()
        stepwise = torch.stack(steps, 0)
        step_experts = probe.experts()
        step_experts_same = all(
            torch.equal(step_experts[l].sort(-1).values, full_experts[l][P:].sort(-1).values) for l in step_experts)
        assert step_experts_same, "recurrent decode routes a token to other experts than the chunked forward"

        # every position token by token through the cache, from position 0 (what a decode loop does)
        cache, steps = None, []
        for t in range(T):
            s = m(x[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = s.past_key_values
            steps.append(s.logits[0, -1].float())
        rec_all = torch.stack(steps, 0)

        # P-token prefill, then the remaining T-P tokens in one cached call (chunked, from the cached state)
        c = m(x[:, :P], use_cache=True)
        cont = m(x[:, P:], past_key_values=c.past_key_values, use_cache=True).logits[0].float()

        # EOS disabled (eos_token_id=None) so all G tokens are pure argmax.
        # (generate fills unset fields from model.generation_config, whose eos_token_id 2 would stop it: swap it out)
        gc = GenerationConfig(do_sample=False, max_new_tokens=G, eos_token_id=None, bos_token_id=1, pad_token_id=0)
        saved_gc, m.generation_config = m.generation_config, GenerationConfig(bos_token_id=1, pad_token_id=0)
        gen = m.generate(x, generation_config=gc)[0, T:].tolist()
        m.generation_config = saved_gc
        # independent check: cache-free argmax loop; also the top-1 vs top-2 logit gap of every greedy step
        cur, top_gaps, nocache_next = list(ids), [], None
        for i in range(G):
            lg = m(torch.tensor([cur]), use_cache=False).logits[0, -1].float()
            if i == 1:
                nocache_next = lg
            s = lg.sort(descending=True).values
            top_gaps.append(float(s[0] - s[1]))
            cur.append(int(lg.argmax()))
        assert len(gen) == G and cur[T:] == gen, (gen, cur[T:])

        # one decode step after the whole prompt: feed greedy_ids[0] through the cache
        c = m(x, use_cache=True)
        dec = m(torch.tensor([[gen[0]]]), past_key_values=c.past_key_values, use_cache=True).logits[0, -1].float()

        # router margins over the whole prompt + greedy continuation (every token the engine will route)
        probe = Probe(m)
        m(torch.tensor([cur]), use_cache=False)
        probe.remove()
        all_router = probe.logits()
        all_experts = probe.experts()
        stats = deltanet_stats(m, hidden)
    return dict(full=full, hidden=hidden, last_out=last_out, prefill=prefill, stepwise=stepwise, cont=cont,
                rec_all=rec_all,
                dec=dec, nocache_next=nocache_next, gen=gen, top_gaps=top_gaps, router=all_router,
                experts=all_experts, conv_states=conv_states, rec_states=rec_states, layout=layout,
                deltanet=stats, step_experts_same=step_experts_same)


def margin_facts(r, k):
    mg = router_margins(r["router"], k)
    per_layer, ties = {}, []
    mins = {"prompt": math.inf, "all": math.inf}
    for l, g in mg.items():
        lg, pg = g["logit_gap"], g["prob_gap"]
        per_layer[str(l)] = {
            "min_logit_gap_prompt": float(lg[:T].min()), "argmin_token_prompt": int(lg[:T].argmin()),
            "min_logit_gap_prompt_plus_greedy": float(lg.min()), "argmin_token_prompt_plus_greedy": int(lg.argmin()),
            "min_prob_gap_prompt_plus_greedy": float(pg.min()),
        }
        mins["prompt"] = min(mins["prompt"], float(lg[:T].min()))
        mins["all"] = min(mins["all"], float(lg.min()))
        for t in (lg < NEAR_TIE).nonzero().flatten().tolist():
            ties.append({"layer": l, "position": t, "logit_gap": float(lg[t]), "prob_gap": float(pg[t])})
    return mins, per_layer, ties


def usage(experts, E):
    return {str(l): torch.bincount(e.flatten(), minlength=E).tolist() for l, e in experts.items()}


# ----------------------------------------------------------------------------------------------------
# one case
def build_case(name, d, cfg, ids):
    k, E = cfg.num_experts_per_tok, cfg.num_experts
    tried = []
    for seed in range(PARAM_SEED, PARAM_SEED + MAX_SEED_TRIES):
        fresh_dir(d)
        torch.manual_seed(0)
        model = Qwen3NextForCausalLM(cfg).to(torch.float32)
        rules = perturb_(model, torch.Generator().manual_seed(seed))
        model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2)
        model = model.to(torch.bfloat16)
        model.save_pretrained(d)
        m = load(d, torch.float32)
        # the f32 model holds exactly the bf16 values
        sd_bf16 = model.state_dict()
        for n_, v_ in m.state_dict().items():
            assert torch.equal(v_, sd_bf16[n_].float()), n_
        r = references(m, ids)
        mins, per_layer, ties = margin_facts(r, k)
        min_gap = min(r["top_gaps"])
        eos_free = cfg.eos_token_id not in r["gen"]
        # conditioning: HF f32 vs HF f64 on the same weights, and the recurrent/continued paths vs the chunked one
        with torch.no_grad():
            l64 = load(d, torch.float64)(torch.tensor([ids]), use_cache=False).logits[0]
        full = r["full"]
        cond = {
            "hf_f32_minus_hf_f64": (full.double() - l64).abs().max().item(),
            "stepwise_minus_hf_f64": (r["stepwise"].double() - l64[P:]).abs().max().item(),
            "continued_prefill_minus_hf_f64": (r["cont"].double() - l64[P:]).abs().max().item(),
            "stepwise_minus_logits_f32": (r["stepwise"] - full[P:]).abs().max().item(),
            "continued_prefill_minus_logits_f32": (r["cont"] - full[P:]).abs().max().item(),
            "token_by_token_minus_hf_f64": (r["rec_all"].double() - l64).abs().max().item(),
            "token_by_token_minus_logits_f32": (r["rec_all"] - full).abs().max().item(),
        }
        worst = max(cond.values())
        ok = mins["all"] > MIN_MARGIN and min_gap > MIN_MARGIN and eos_free and worst < COND_MAX
        tried.append({"seed": seed, "min_router_logit_margin": mins["all"], "min_greedy_top1_top2_gap": min_gap,
                      "greedy_ids": r["gen"], "f32_noise_max_abs": worst, "accepted": ok})
        print(f"[{name}] seed {seed}: min router margin {mins['all']:.4g}, min greedy top1-top2 {min_gap:.4g}, "
              f"f32 noise {worst:.3g}, greedy {r['gen']} -> {'ok' if ok else 'rejected'}")
        if ok:
            break
    else:
        sys.exit(f"[{name}] no seed in {PARAM_SEED}..{PARAM_SEED + MAX_SEED_TRIES - 1} passes the checks")
    print(f"[{name}] noise rules applied: {rules}")

    # the checkpoint: hub naming, BF16, exactly the tensors the config implies
    table = tensor_table(os.path.join(d, "model.safetensors"))
    expected = expected_tensors(cfg)
    assert table == expected, {"missing": sorted(set(expected) - set(table)),
                               "unexpected": sorted(set(table) - set(expected)),
                               "shape": [n for n in table if n in expected and table[n] != expected[n]]}
    with open(os.path.join(d, "config.json")) as f:
        saved_cfg = json.load(f)
    assert saved_cfg["layer_types"] == cfg.layer_types and "full_attention_interval" not in saved_cfg
    # reload check: a fresh f32 load of the saved files gives the same logits bit for bit
    with torch.no_grad():
        again = load(d, torch.float32)(torch.tensor([ids]), use_cache=False).logits[0].float()
    reload_same = torch.equal(again, r["full"])
    assert reload_same

    d_step = (r["stepwise"] - full[P:]).abs()
    d_cont = (r["cont"] - full[P:]).abs()
    d_pre = (r["prefill"] - full[:P]).abs().max().item()
    d_dec = (r["dec"] - r["nocache_next"]).abs().max().item()
    print(f"[{name}] logits std {full.std():.3f}  |stepwise(recurrent) - chunked| max {d_step.max():.3e}  "
          f"|continued prefill - chunked| {d_cont.max():.3e}  |prefill{P} - chunked| {d_pre:.3e}  "
          f"|decode_last - no-cache| {d_dec:.3e}  greedy {r['gen']}")
    for v in (d_step.max(), d_cont.max(), d_pre, d_dec):
        assert v < TOL_ABS, v

    # bf16 run (informational)
    mb = load(d, torch.bfloat16)
    bf16_param_dtypes = sorted({f"{n.split('.')[-2]}.{n.split('.')[-1]}: {p.dtype}"
                                for n, p in mb.named_parameters() if p.dtype != torch.bfloat16})
    with torch.no_grad():
        lb = mb(torch.tensor([ids]), use_cache=False).logits[0].float()
        cb = mb(torch.tensor([ids[:P]]), use_cache=True).past_key_values
        lin0 = cfg.layer_types.index("linear_attention")
        bf16_cache = {"conv_state_dtype": str(cb.layers[lin0].conv_states[0].dtype),
                      "recurrent_state_dtype": str(cb.layers[lin0].recurrent_states[0].dtype)}
    bdiff = (lb - full).abs().max(dim=-1).values
    top1 = int((lb.argmax(-1) == full.argmax(-1)).sum())
    print(f"[{name}] bf16 vs f32: max |Δ| {bdiff.max():.3f}, top-1 agree {top1}/{T}")

    save_reference(d, r, lb, l64)
    facts = {
        "seed_search": tried,
        "param_seed": tried[-1]["seed"],
        "noise_rule_counts": rules,
        "chunked_vs_recurrent": {
            "stepwise_minus_logits_f32_max_abs": float(d_step.max()),
            "stepwise_minus_logits_f32_max_abs_per_position": [float(f"{v:.3e}") for v in d_step.max(-1).values],
            "continued_prefill_minus_logits_f32_max_abs": float(d_cont.max()),
            f"prefill{P}_minus_logits_f32_first{P}_max_abs": d_pre,
            "decode_last_minus_nocache_forward_max_abs": d_dec,
            "recurrent_router_choices_equal_chunked": r["step_experts_same"],
            "f32_noise_vs_hf_f64": cond,
            "required_f32_noise_lt": COND_MAX,
            "how": f"logits_f32 = one forward over all {T} tokens (use_cache=False): HF's chunked delta rule "
                   f"(chunk {CHUNK}, zero-padded to {math.ceil(T / CHUNK) * CHUNK}). stepwise = prefill input_ids[:{P}] "
                   f"(chunked) then input_ids[{P}:] one token at a time through the cache (HF's "
                   "torch_recurrent_gated_delta_rule + causal_conv1d_update), compared at the same positions. "
                   f"continued_prefill = prefill input_ids[:{P}] then input_ids[{P}:] in one cached call (chunked from "
                   "the cached recurrent state, conv over the cached inputs). token_by_token = every position fed "
                   "one token per call from position 0 (not stored; its differences are in f32_noise_vs_hf_f64). "
                   "hf_f64 = the same checkpoint loaded with dtype=float64 (logits_f64ref).",
        },
        "router_margin": {
            "definition": "per token and MoE layer: (k-th largest) - (k+1-th largest) f32 router logit, k = "
                          "num_experts_per_tok (= the probability order; prob gap listed too)",
            "min_prompt": mins["prompt"],
            "min_prompt_plus_greedy": mins["all"],
            "required_gt": MIN_MARGIN,
            "per_layer": per_layer,
            f"near_ties_logit_gap_lt_{NEAR_TIE}": ties,
        },
        "expert_usage_prompt_plus_greedy": usage(r["experts"], E),
        "greedy_top1_top2_logit_gap": r["top_gaps"],
        "deltanet": r["deltanet"],
        "hf_cache_layout": {
            "per_linear_layer": r["layout"],
            "conv_state": "cache.layers[l].conv_states[0]: [B, C_conv, Kc] in the model dtype = the last Kc PRE-conv "
                          "inputs u (channels [all q | all k | all v], i.e. after the per-key-head regrouping of "
                          "in_proj_qkvz), column Kc-1 newest, zero-padded on the left when fewer than Kc tokens were "
                          "seen. A decode step concatenates [conv_state (Kc cols), u_t], runs the depthwise conv "
                          "without padding and keeps the last output, so only the newest Kc-1 columns matter. "
                          "Checked here: conv_state == u[P-Kc:P]ᵀ with u rebuilt from docs/models.md §4.5.",
            "recurrent_state": "cache.layers[l].recurrent_states[0]: [B, Nv, dk, dv] f32 (S with S[k,v], o = Sᵀq)",
            "full_attention": "DynamicLayer k/v [B, nkv, t, d] after k_norm and RoPE",
        },
        "bf16_vs_f32": {"max_abs_per_token": [round(float(v), 5) for v in bdiff], "top1_agree": top1,
                        "params_not_bf16_in_bf16_load": bf16_param_dtypes,
                        "linear_layer_cache_dtypes_in_bf16_mode": bf16_cache},
        "reload_same_logits": reload_same,
    }
    return r, facts, table


def save_reference(d, r, lb, l64):
    L = len(r["hidden"]) - 1
    ref = {"logits_f32": r["full"], "logits_f64ref": l64.float(), "stepwise_logits_f32": r["stepwise"],
           "continued_prefill_logits_f32": r["cont"], "decode_last_logits_f32": r["dec"],
           "greedy_ids": torch.tensor(r["gen"], dtype=torch.float32), "last_layer_out_f32": r["last_out"],
           "logits_bf16": lb}
    for i, h in enumerate(r["hidden"]):
        ref[f"hidden_f32_{i}"] = h
    for l in r["conv_states"]:
        ref[f"conv_state_after_prefill_f32_{l}"] = r["conv_states"][l]
        ref[f"recurrent_state_after_prefill_f32_{l}"] = r["rec_states"][l]
    for key, v in ref.items():
        assert v.dtype == torch.float32, key
    save_file({key: v.contiguous() for key, v in ref.items()}, os.path.join(d, "reference.safetensors"),
              # one key only: safetensors writes metadata from a hash map, so >1 key is unordered
              metadata={"generator": "scripts/make_golden_qwen3_next.py (versions in reference.json)"})


def reference_keys(L, lin_layers):
    return {
        "logits_f32": f"[T,V] full prompt forward, use_cache=False (chunked delta rule, {math.ceil(T / CHUNK)} chunks "
                      f"of {CHUNK})",
        "stepwise_logits_f32": f"[T-P,V] = [{T - P},{VOCAB}]: prefill input_ids[:{P}] with use_cache=True, then "
                               f"input_ids[{P}:] one token per call through the cache (recurrent form); row i is "
                               f"position {P}+i, compare with logits_f32[{P}+i]",
        "continued_prefill_logits_f32": f"[T-P,V]: prefill input_ids[:{P}], then input_ids[{P}:] in ONE cached call",
        "decode_last_logits_f32": "[V] prefill all of input_ids with use_cache=True, then ONE decode step of "
                                  "greedy_ids[0]: the logits at position T (they predict greedy_ids[1]). NB: unlike "
                                  "the GPT-OSS/Llama fixtures this is NOT 'prefill ids[:-1] + decode ids[-1]' (that "
                                  "path is the last row of stepwise_logits_f32)",
        "hidden_f32_0": "[T,H] input embeddings",
        **{f"hidden_f32_{i}": f"[T,H] output of layer {i - 1} (residual stream)" for i in range(1, L)},
        f"hidden_f32_{L}": "[T,H] AFTER the final norm (HF output_hidden_states convention: the last entry is "
                           "overwritten by the final-norm output)",
        "last_layer_out_f32": f"[T,H] output of layer {L - 1}, BEFORE the final norm (forward hook)",
        **{f"conv_state_after_prefill_f32_{l}": f"[C_conv,Kc] HF conv cache of layer {l} after the {P}-token "
                                                f"prefill: column j = pre-conv input u at position {P}-Kc+j "
                                                "(channels [Q|K|V])" for l in lin_layers},
        **{f"recurrent_state_after_prefill_f32_{l}": f"[Nv,dk,dv] HF delta-rule state S of layer {l} after the "
                                                     f"{P}-token prefill" for l in lin_layers},
        "greedy_ids": f"[{G}] greedy continuation ids stored as F32 values",
        "logits_bf16": "[T,V] HF bf16 run (dtype=bfloat16), upcast to f32; informational only",
        "logits_f64ref": "[T,V] HF run with dtype=float64 on the same weights (HF still computes the RoPE tables and "
                         "the router/attention softmax in f32), rounded to f32; informational: the f32 noise floor "
                         "(logits_f32 - logits_f64ref) is listed in reference.json",
    }


def config_summary(cfg):
    keys = ["vocab_size", "hidden_size", "num_hidden_layers", "layer_types", "num_attention_heads",
            "num_key_value_heads", "head_dim", "attention_bias", "rope_parameters", "partial_rotary_factor",
            "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
            "linear_conv_kernel_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
            "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
            "intermediate_size", "rms_norm_eps", "hidden_act", "max_position_embeddings", "tie_word_embeddings",
            "bos_token_id", "eos_token_id"]
    out = {key: copy.deepcopy(getattr(cfg, key)) for key in keys}
    Nk, Nv, dk, dv = cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim, \
        cfg.linear_value_head_dim
    out["derived"] = {
        "rotary_dims": int(cfg.head_dim * cfg.rope_parameters["partial_rotary_factor"]),
        "r_value_heads_per_key_head": Nv // Nk, "Dk": Nk * dk, "Dv": Nv * dv, "C_conv": 2 * Nk * dk + Nv * dv,
        "moe_layers": [l for l in range(cfg.num_hidden_layers) if is_moe_layer(cfg, l)],
        "dense_mlp_layers": [l for l in range(cfg.num_hidden_layers) if not is_moe_layer(cfg, l)],
        "deltanet_chunk_size_hf": CHUNK,
    }
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", nargs="?", default=os.path.join(os.path.dirname(__file__), "..",
                                                              "fixtures", "golden"))
    ap.add_argument("--any-version", action="store_true")
    a = ap.parse_args()
    versions = check_versions(a.any_version)
    kernel_path = check_kernel_path()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()      # the "falling back to the torch implementation" warnings

    ids = prompt_ids()
    dirs = []
    for name, over in CASES.items():
        kw = copy.deepcopy(BASE_CFG)
        kw.update(copy.deepcopy(over))
        cfg = Qwen3NextConfig(**kw)
        assert cfg.layer_types == BASE_CFG["layer_types"]
        d = os.path.join(a.outdir, name)
        r, facts, table = build_case(name, d, cfg, ids)
        L = cfg.num_hidden_layers
        lin = [l for l in range(L) if cfg.layer_types[l] == "linear_attention"]
        ref = {
            "input_ids": ids,
            "greedy_ids": r["gen"],
            "generator": "scripts/make_golden_qwen3_next.py",
            **versions,
            "torch_full": torch.__version__,
            "tolerance_abs": TOL_ABS,
            "prefill_len_for_stepwise": P,
            "param_seed": facts.pop("param_seed"),
            "param_noise": "Qwen3-Next variant of docs/models.md §6.1: zero-centred norms (applied as 1+w) 0.2N, "
                           "linear_attn.norm.weight 1+0.2N, dt_bias 1+0.5N, router (mlp.gate.weight) 0.3N, A_log = log of a log-spaced ladder "
                           f"{A_LADDER[0]}..{A_LADDER[1]} over the Nv heads (randperm per layer) + 0.1N, conv1d.weight "
                           "0.5N, every other matrix 0.1N; torch.manual_seed(0) before construction, "
                           "torch.Generator().manual_seed(param_seed) for the noise in named_parameters() order "
                           "(fused in-memory expert tensors), then cast to bf16",
            "config": config_summary(cfg),
            "kernel_path": kernel_path,
            **facts,
            "reference_tensors": reference_keys(L, lin),
            "model_tensors": table,
            "note": "f32 reference: the bf16 checkpoint loaded with from_pretrained(dtype=float32) (weights are exactly "
                    "the bf16 values), CPU, attn_implementation='eager', experts_implementation='eager', "
                    "torch.set_num_threads(1), HF's torch reference path for the delta rule and the conv (no fla / "
                    "causal_conv1d). logits_bf16: the same checkpoint loaded with dtype=bfloat16; bf16 is noisy, use "
                    "it for information only. input_ids[i] = (7i^2+3i+1) mod V, no BOS added. greedy_ids = "
                    f"{G} argmax tokens after input_ids (generate do_sample=False with the cache, eos_token_id=None "
                    "so EOS does not stop it; checked against a cache-free argmax loop). Router logits were taken "
                    "with forward hooks on mlp.gate. save_pretrained wrote the experts per expert (hub naming; HF "
                    "fuses them to mlp.experts.gate_up_proj [E,2Ie,H] / down_proj [E,H,Ie] in memory only).",
        }
        dump_json(ref, os.path.join(d, "reference.json"))
        dirs.append(d)

    for d in dirs:
        tot = 0
        for f in sorted(os.listdir(d)):
            sz = os.path.getsize(os.path.join(d, f))
            tot += sz
            print(f"  {os.path.relpath(os.path.join(d, f), a.outdir)}  {sz} bytes")
        print(f"  {os.path.relpath(d, a.outdir)}: {tot} bytes in all")


if __name__ == "__main__":
    main()
