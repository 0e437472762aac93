"""A whole tiny model on the (simulated) CUDA device against the CPU path: same logits for a batched prefill and for
token-by-token decode after it."""

import numpy as np
import pytest
from simhelp import MemoryContainer, stored

from lowbit.errors import LowbitError
from lowbit.formats.qtypes import REGISTRY
from lowbit.models import family_for
from lowbit.models.device_forward import cuda_model
from lowbit.models.llama import ModelArgs

# the CPU decode path quantizes activations to int16 before its integer dot products, and prefill uses BLAS; the
# device computes in float32 throughout, so the two agree to ~1e-4 of the logit range, not bit for bit
RTOL = 2e-3
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
    cpu = module.Model(args, c, 16)
    gpu = cuda_model(family, module, args, c, 16)
    prompt = [5, 17, 90, 3, 64, 41]
    want, got = run(cpu, prompt, STEPS), run(gpu, prompt, STEPS)
    assert [g.shape for g in got] == [w.shape for w in want] == [(6, VOCAB)] + [(1, VOCAB)] * STEPS
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=RTOL * np.abs(w).max())
    # greedy decode chose the same tokens on both (the runs above fed each its own argmax)
    assert [int(np.argmax(w[-1])) for w in want] == [int(np.argmax(g[-1])) for g in got]
    if args.num_hidden_layers == 1:  # the last-position default gives the last row of all_logits
        last = gpu.forward(np.array(prompt), 0, gpu.new_cache())
        np.testing.assert_allclose(last[0], got[0][-1], rtol=1e-6, atol=1e-6)


def test_unsupported_family_is_named():
    args, c = tiny("q4_g32", "q8_g32", layers=1)
    name, module = family_for("gemma")
    with pytest.raises(LowbitError, match=r"gemma model family is not supported on --device cuda"):
        cuda_model(name, module, args, c, 16)


def test_weight_extras_are_refused():
    args, c = tiny("q4_g32", "q8_g32", layers=1)
    c.tensors["blk.0.attn_q.lr_a"] = stored("blk.0.attn_q.lr_a", REGISTRY["f32"], (64, 4), np.random.default_rng(0))
    _, module = family_for("llama")
    with pytest.raises(LowbitError, match=r"blk\.0\.attn_q has extras \(blk\.0\.attn_q\.lr_a\).*not supported on "
                                          r"--device cuda yet"):
        cuda_model("llama", module, args, c, 16)
