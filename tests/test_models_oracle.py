"""Logits and greedy continuations against transformers (the numerics oracle) on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowbit.convert.converter import ConvertOptions, convert
from lowbit.runtime.engine import Engine

KINDS = ("llama", "llama3", "mistral", "qwen2")


def hf_logits(folder, ids):
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy(), model


def hf_greedy(model, ids, n):
    import torch

    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            out.append(nxt)
    return out


def lowbit_greedy(engine, ids, n):
    engine.eos_ids = set()  # compare raw greedy streams, eos included
    return [ev.token for ev in engine.generate(ids, max_tokens=n)]


def close(got, want, rel):
    scale = np.abs(want).max()
    err = np.abs(got - want).max()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} * {scale:.3g}"


@pytest.fixture(scope="module")
def prompt():
    return list(np.random.default_rng(7).integers(3, 4096, size=32))


@pytest.mark.parametrize("kind", KINDS)
def test_unquantized_matches_transformers(kind, tiny_models, tmp_path, prompt):
    folder = tiny_models[kind]
    path = convert(str(folder), tmp_path / "m.lowbit", ConvertOptions(bits=16), progress=False)
    want, model = hf_logits(folder, prompt)
    eng = Engine(path, ctx=128, kv="32")  # a float32 KV cache (the default float16 one: test_families.py)
    # batched prefill
    close(eng.logits_all(prompt), want, 1e-4)
    # token by token through the KV cache
    eng.reset()
    steps = [eng.prefill(prompt[:1])]
    steps += [eng.step(t) for t in prompt[1:]]
    close(np.stack(steps), want, 1e-4)
    # greedy continuation
    assert lowbit_greedy(eng, prompt, 32) == hf_greedy(model, prompt, 32)


@pytest.mark.parametrize("kind", ("llama", "qwen2"))
def test_eight_bit_close_to_transformers(kind, tiny_models, tmp_path, prompt):
    folder = tiny_models[kind]
    path = convert(str(folder), tmp_path / "m8.lowbit", ConvertOptions(bits=8), progress=False)
    want, _ = hf_logits(folder, prompt)
    eng = Engine(path, ctx=128)
    # random tiny weights are harsher than trained ones; refsmall 8-bit is checked in test_refsmall.py
    close(eng.logits_all(prompt), want, 3e-2)


def test_older_config_keys_give_same_model(tiny_models, tmp_path, prompt):
    """rope_theta + rope_scaling (transformers < 5) and rope_parameters (>= 5) must convert to the same model."""
    import shutil

    src = tiny_models["llama3"]
    old = tmp_path / "old"
    shutil.copytree(src, old)
    cfg = json.loads((old / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    (old / "config.json").write_text(json.dumps(cfg))
    a = Engine(convert(str(src), tmp_path / "a.lowbit", ConvertOptions(bits=16), progress=False), ctx=64)
    b = Engine(convert(str(old), tmp_path / "b.lowbit", ConvertOptions(bits=16), progress=False), ctx=64)
    assert a.args == b.args
    np.testing.assert_array_equal(a.logits_all(prompt), b.logits_all(prompt))
