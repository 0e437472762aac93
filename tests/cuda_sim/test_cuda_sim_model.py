"""A whole tiny model on the (simulated) CUDA device against the CPU path: same logits for a batched prefill and for
token-by-token decode after it."""

from types import SimpleNamespace

import numpy as np
import pytest
from simhelp import MemoryContainer, stored

from lowbit.errors import LowbitError
from lowbit.formats.qtypes import REGISTRY
from lowbit.kernels import act_quant
from lowbit.kernels.cuda.backend import CudaOps
from lowbit.models import family_for
from lowbit.models.device_forward import cuda_model
from lowbit.models.llama import ModelArgs

# the CPU decode path quantizes activations to int16 before its integer dot products, and prefill uses BLAS; the
# device computes in float32 throughout, so the two agree to ~1e-4 of the logit range, not bit for bit. On a CPU
# without the byte dot product prompts of up to 8 tokens take the int16 kernels too; gemma3's soft-capped logits
# (cap 3 here) then differ by up to 2.6e-3 of their range in one element of 576 (an AVX2 host)
RTOL = 3e-3
VOCAB = 96
STEPS = 2  # decode steps after the prefill


def tiny(layer_qtype: str, embed_qtype: str, *, bias=False, tied=False, window=0, layers=2):
    """A random llama-shaped model (hidden 64, MLP 64, vocab 96, GQA 4/2 heads) as (args, container)."""
    args = ModelArgs(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, intermediate_size=64, rms_norm_eps=1e-5,
                     max_position_embeddings=64, tie_word_embeddings=tied, sliding_window=window)
    rng = np.random.default_rng(7)
    lq, eq, f32 = REGISTRY[layer_qtype], REGISTRY[embed_qtype], REGISTRY["f32"]
    ts = {"token_embd.weight": stored("token_embd.weight", eq, (VOCAB, 64), rng, 0.2),
          "output_norm.weight": stored("output_norm.weight", f32, (64,), rng)}
    if not tied:
        ts["output.weight"] = stored("output.weight", eq, (VOCAB, 64), rng)
    shapes = {"attn_q": (64, 64), "attn_k": (32, 64), "attn_v": (32, 64), "attn_output": (64, 64),
              "ffn_gate": (64, 64), "ffn_up": (64, 64), "ffn_down": (64, 64)}
    for i in range(layers):
        for k in ("attn_norm", "ffn_norm"):
            ts[f"blk.{i}.{k}.weight"] = stored(f"blk.{i}.{k}.weight", f32, (64,), rng)
        for k, shape in shapes.items():
            ts[f"blk.{i}.{k}.weight"] = stored(f"blk.{i}.{k}.weight", lq, shape, rng)
            if bias and k in ("attn_q", "attn_k", "attn_v"):
                b = f"blk.{i}.{k}.bias"
                ts[b] = stored(b, f32, (shape[0],), rng)
    return args, MemoryContainer(ts)


def run(model, prompt, steps):
    """Prefill logits [T, vocab] (all positions), then the logits of each greedy decode step."""
    cache = model.new_cache()
    out = [model.forward(np.array(prompt), 0, cache, all_logits=True)]
    tok = int(np.argmax(out[0][-1]))
    for i in range(steps):
        out.append(model.forward(np.array([tok]), len(prompt) + i, cache))
        tok = int(np.argmax(out[-1][0]))
    return out


def assert_device_matches_cpu(family, module, args, c):
    """The same tiny model on the CPU (int16-precision activations: the device multiplies float ones) and on the
    device, prefill then STEPS greedy decode steps: the logits agree to RTOL of their range and greedy decode
    chose the same tokens on both (each run fed its own argmax). Returns the device model, the prompt and the
    device's logits."""
    cpu = module.Model(args, c, 16)
    act_quant.set_kernel_precision(cpu, True)
    gpu = cuda_model(family, module, args, c, 16)
    prompt = [5, 17, 90, 3, 64, 41]
    want, got = run(cpu, prompt, STEPS), run(gpu, prompt, STEPS)
    assert [g.shape for g in got] == [w.shape for w in want] == [(6, VOCAB)] + [(1, VOCAB)] * STEPS
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=RTOL * np.abs(w).max())
    assert [int(np.argmax(w[-1])) for w in want] == [int(np.argmax(g[-1])) for g in got]
    return gpu, prompt, got


@pytest.mark.parametrize(
    "family,layer_qtype,embed_qtype,extra",
    [
        ("llama", "q4a_g32", "q8_g32", {}),
        ("qwen2", "q3_pc", "f16", {"bias": True, "tied": True, "layers": 1}),
        ("llama", "q5a_g64", "bf16", {"window": 3, "layers": 1}),  # mistral-style sliding window, decode past it
    ],
    ids=["llama-q4a_g32", "qwen2-bias-tied-q3_pc", "mistral-window-q5a_g64"],
)
def test_device_forward_matches_cpu(family, layer_qtype, embed_qtype, extra):
    args, c = tiny(layer_qtype, embed_qtype, **extra)
    _, module = family_for(family)
    gpu, prompt, got = assert_device_matches_cpu(family, module, args, c)
    if args.num_hidden_layers == 1:  # the last-position default gives the last row of all_logits
        last = gpu.forward(np.array(prompt), 0, gpu.new_cache())
        np.testing.assert_allclose(last[0], got[0][-1], rtol=1e-6, atol=1e-6)


# the other families from HF-style configs (parsed by each family's args_from_hf), one or two layers each
BASE_CFG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
FAMILY_CASES = {
    # q/k norms, head_dim 32 != 64 / 4, q/k/v biases, tied embeddings
    "qwen3": ("qwen3", dict(head_dim=32, attention_bias=True, tie_word_embeddings=True), "q4_g32", "f16"),
    # (1 + w) norms, bf16-rounded embedding scale, GeGLU, tied
    "gemma": ("gemma", dict(head_dim=16, dtype="bfloat16"), "q5_g32", "q8_g32"),
    # sandwich norms, query_pre_attn_scalar, attention and final soft-caps, a sliding layer (window 3)
    "gemma2": ("gemma2", dict(head_dim=16, sliding_window=3, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                              final_logit_softcapping=3.0), "q6a_g64", "bf16"),
    # q/k (1 + w) norms, a sliding layer with the local rope then a global one with linear-scaled rope, final soft-cap
    "gemma3": ("gemma3_text", dict(num_hidden_layers=2, head_dim=16, sliding_window=3,
                                   layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24,
                                   final_logit_softcapping=3.0, rope_parameters={
                                       "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e5},
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
               "q4a_g32", "f32"),
    # fused qkv / gate_up, longrope beyond its original 8 positions (long factors, attention factor), half the head
    # rotated, window 4 on every layer
    "phi3": ("phi3", dict(original_max_position_embeddings=8, sliding_window=4, rope_parameters={
        "rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
        "short_factor": [1.0, 1.2, 1.4, 1.6], "long_factor": [1.5, 2.2, 2.9, 3.6]}), "q3a_g32", "q8a_g64"),
}


def tiny_family(model_type: str, cfg: dict, layer_qtype: str, embed_qtype: str):
    """(family name, module, args, container) of a random model of that family; biases on q/k/v when the config
    asks for them."""
    name, module = family_for(model_type)
    args = module.args_from_hf({**BASE_CFG, **cfg})
    h, i, hd = args.hidden_size, args.intermediate_size, args.head_dim
    nq, nkv = args.num_attention_heads * hd, args.num_key_value_heads * hd
    shapes = {"token_embd": (VOCAB, h), "output": (VOCAB, h), "attn_q": (nq, h), "attn_k": (nkv, h),
              "attn_v": (nkv, h), "attn_qkv": (nq + 2 * nkv, h), "attn_output": (h, nq), "ffn_gate": (i, h),
              "ffn_up": (i, h), "ffn_gate_up": (2 * i, h), "ffn_down": (h, i), "attn_q_norm": (hd,),
              "attn_k_norm": (hd,)}
    rng = np.random.default_rng(11)
    ts = {}
    for t in module.expected_tensors(args):
        kind = t.split(".")[-2]
        shape = shapes.get(kind, (h,))
        qt = REGISTRY["f32" if len(shape) == 1 else embed_qtype if kind in ("token_embd", "output") else layer_qtype]
        ts[t] = stored(t, qt, shape, rng, 0.2 if kind == "token_embd" else 0.05)
        if cfg.get("attention_bias") and kind in ("attn_q", "attn_k", "attn_v"):
            b = t.replace(".weight", ".bias")
            ts[b] = stored(b, REGISTRY["f32"], (shape[0],), rng)
    return name, module, args, MemoryContainer(ts)


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_family_on_device_matches_cpu(case):
    name, module, args, c = tiny_family(*FAMILY_CASES[case])
    assert name == case
    gpu, _, _ = assert_device_matches_cpu(name, module, args, c)
    assert type(gpu) is module.Model and isinstance(gpu.ops, CudaOps)


def test_family_not_built_on_the_llama_blocks_is_named():
    args, c = tiny("q4_g32", "q8_g32", layers=1)
    with pytest.raises(LowbitError, match=r"the mamba model family has no device forward .*use --device cpu"):
        cuda_model("mamba", SimpleNamespace(Model=object), args, c, 16)


def test_weight_extras_are_refused():
    args, c = tiny("q4_g32", "q8_g32", layers=1)
    c.tensors["blk.0.attn_q.lr_a"] = stored("blk.0.attn_q.lr_a", REGISTRY["f32"], (64, 4), np.random.default_rng(0))
    _, module = family_for("llama")
    with pytest.raises(LowbitError, match=r"blk\.0\.attn_q has extras \(blk\.0\.attn_q\.lr_a\).*not supported on "
                                          r"--device cuda yet"):
        cuda_model("llama", module, args, c, 16)
