"""Converter inputs: sharded and f16 checkpoints, tied embeddings, hub ids from an offline cache, awkward shapes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from lbtest import TOKENIZER_FILES

from lowbit.convert.converter import ConvertOptions, choose_qtype, convert
from lowbit.formats.reader import Container
from lowbit.runtime.engine import Engine

PROMPT = [1, 450, 3000, 17, 99, 1024, 7, 8, 9, 10]


def save_variant(src, dst, **save_kw):
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    if save_kw.pop("half", False):
        model = model.half()
    model.save_pretrained(dst, **save_kw)
    for f in TOKENIZER_FILES:
        shutil.copy(src / f, dst / f)
    return dst


def logits(path):
    return Engine(path, ctx=32).logits_all(PROMPT)


def test_sharded_checkpoint_equals_single_file(tiny_models, tmp_path):
    src = tiny_models["llama"]
    sharded = save_variant(src, tmp_path / "sharded", max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a = convert(str(src), tmp_path / "a.lowbit", ConvertOptions(bits=16), progress=False)
    b = convert(str(sharded), tmp_path / "b.lowbit", ConvertOptions(bits=16), progress=False)
    np.testing.assert_array_equal(logits(a), logits(b))


def test_f16_source(tiny_models, tmp_path):
    src = save_variant(tiny_models["llama"], tmp_path / "half", half=True)
    out = convert(str(src), tmp_path / "h.lowbit", ConvertOptions(bits=16), progress=False)
    c = Container(out)
    assert c.tensor("blk.0.ffn_up.weight").qtype.name == "f16"
    ref = logits(convert(str(tiny_models["llama"]), tmp_path / "f.lowbit", ConvertOptions(bits=16), progress=False))
    np.testing.assert_allclose(logits(out), ref, atol=2e-2 * np.abs(ref).max())


@pytest.mark.parametrize("kind", ["bf16", "f16"])
def test_float_type_writes_float32_sources_as_16_bit(tiny_models, tmp_path, kind):
    """--bits 16 --float-type: every matrix of a float32 checkpoint as bfloat16 or float16, rounded to nearest
    (norms stay float32); without it float32 stays float32."""
    from safetensors.numpy import load_file

    src = tiny_models["llama"]
    f32 = Container(convert(str(src), tmp_path / "f.lowbit", ConvertOptions(bits=16), progress=False))
    assert f32.tensor("blk.0.ffn_up.weight").qtype.name == "f32"
    c = Container(convert(str(src), tmp_path / "h.lowbit", ConvertOptions(bits=16, float_type=kind), progress=False))
    raw = load_file(str(src / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"].astype(np.float32)
    t = c.tensor("blk.0.ffn_up.weight")
    assert t.qtype.name == kind and c.tensor("token_embd.weight").qtype.name == kind
    assert c.tensor("blk.0.attn_norm.weight").qtype.name == "f32"
    bits = np.asarray(t.parts["data"]).view(np.uint16)
    if kind == "f16":
        np.testing.assert_array_equal(bits, raw.astype(np.float16).view(np.uint16))
    else:  # nearest bfloat16: no other bfloat16 lies closer to the float32 value
        got = (bits.astype(np.uint32) << 16).view(np.float32)
        up = ((bits.astype(np.uint32) + 1) << 16).view(np.float32)
        down = ((bits.astype(np.uint32) - 1) << 16).view(np.float32)
        err = np.abs(got - raw)
        assert (err <= np.abs(up - raw)).all() and (err <= np.abs(down - raw)).all()
    np.testing.assert_allclose(logits(c.path), logits(f32.path), atol=3e-2 * np.abs(logits(f32.path)).max())


def test_float_type_needs_16_bits(tiny_models, tmp_path):
    from lbtest import assert_clean_error, run_cli

    out = tmp_path / "x.lowbit"
    assert_clean_error(run_cli("convert", str(tiny_models["llama"]), "-o", str(out), "--bits", "4", "--float-type",
                               "bf16"), "--float-type")
    assert not out.exists()


def test_tied_embeddings_stored_once(tiny_models, tmp_path):
    out = convert(str(tiny_models["qwen2"]), tmp_path / "q.lowbit", ConvertOptions(bits=4), progress=False)
    c = Container(out)
    assert "output.weight" not in c
    assert "blk.0.attn_q.bias" in c
    assert c.meta["architecture"]["args"]["tie_word_embeddings"] is True


def test_hub_repo_id_from_offline_cache(tiny_models, tmp_path):
    home = tmp_path / "hf"
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = home / "hub" / "models--acme--tiny-llama"
    snap = repo / "snapshots" / sha
    shutil.copytree(tiny_models["llama"], snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = tmp_path / "hub.lowbit"
    res = subprocess.run(
        [sys.executable, "-m", "lowbit.runtime.cli", "convert", "acme/tiny-llama", "-o", str(out), "--bits", "8"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert Container(out).meta["provenance"]["source"] == "acme/tiny-llama"
    res = subprocess.run(
        [sys.executable, "-m", "lowbit.runtime.cli", "convert", "acme/not-cached", "-o", str(tmp_path / "x.lowbit")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert res.returncode == 2 and "could not be fetched from the hub" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "shape,want",
    [((64, 576), "q4a_g64"), ((64, 96), "q4a_g32"), ((64, 72), "q4a_pc"), ((8, 20), "q4a_pc"), ((7, 3), "f16")],
)
def test_group_size_falls_back_for_awkward_shapes(shape, want):
    assert choose_qtype("blk.0.attn_q.weight", shape, "F32", ConvertOptions(bits=4, group_size=128)).name == want


def test_norms_stay_float_embeddings_six_bit():
    opts = ConvertOptions(bits=3, group_size=64)
    assert choose_qtype("blk.0.attn_norm.weight", (64,), "BF16", opts).name == "f32"
    assert choose_qtype("token_embd.weight", (4096, 64), "BF16", opts).name == "q6a_g64"
    assert choose_qtype("blk.0.ffn_down.weight", (64, 128), "BF16", opts).name == "q3a_g64"
    # 8-bit weights keep 8-bit embeddings; --embed-bits overrides
    assert choose_qtype("output.weight", (4096, 64), "BF16", ConvertOptions(bits=8)).name == "q8_g64"
    assert choose_qtype("output.weight", (4096, 64), "BF16", ConvertOptions(bits=4, embed_bits=8)).name == "q8_g64"


def test_default_groups_of_32_at_4_bits_only():
    """README "Choosing the defaults": 4-bit groups of 32 (6-bit embeddings in groups of 64); other widths keep
    groups of 64."""
    assert choose_qtype("blk.0.attn_q.weight", (64, 128), "F32", ConvertOptions()).name == "q4a_g32"
    assert choose_qtype("token_embd.weight", (4096, 64), "F32", ConvertOptions()).name == "q6a_g64"
    assert choose_qtype("blk.0.attn_q.weight", (64, 128), "F32", ConvertOptions(bits=3)).name == "q3a_g64"
    assert choose_qtype("blk.0.attn_q.weight", (64, 128), "F32", ConvertOptions(bits=4, group_size=64)).name == \
        "q4a_g64"
