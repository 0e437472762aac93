"""Activation quantization (``--act-quant``): the int8 rounding kernel against its numpy specification, dynamic and
static modes on tiny random llamas against transformers, SmoothQuant's exact migration, clean errors."""

from __future__ import annotations

import numpy as np
import pytest
from lbtest import CAL, CALIB, assert_clean_error, hf_logits, rel_err, run_cli

from lowbit.convert import smoothquant
from lowbit.convert.converter import ConvertOptions, convert
from lowbit.convert.methods import parse_method
from lowbit.errors import LowbitError
from lowbit.formats.reader import Container
from lowbit.formats.summary import summarize
from lowbit.kernels import act_quant
from lowbit.runtime.engine import Engine
from lowbit.runtime.measure.configs import parse_configs

LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def logits(path, ids, act="none"):
    return Engine(path, ctx=128, threads=1, act_quant=act).logits_all(ids)


def kl(ref, got):
    def logp(z):
        z = z.astype(np.float64)
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    lp, lq = logp(ref), logp(got)
    return float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())


@pytest.fixture(scope="module")
def eight_bit(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("act8")
    return {
        "plain": convert(str(tiny_llama), root / "plain.lowbit", ConvertOptions(bits=8), progress=False),
        "sq": convert(
            str(tiny_llama), root / "sq.lowbit", ConvertOptions(bits=8, method="smoothquant+rtn", **CAL), progress=False
        ),
    }


# ------------------------------------------------------------------------------------------------ the kernel
@pytest.mark.parametrize("t", [1, 3, 40])
@pytest.mark.parametrize("cols", [1, 7, 64, 130])
def test_kernel_matches_reference(t, cols):
    rng = np.random.default_rng(t * 1000 + cols)
    x = (rng.standard_normal((t, cols)) * rng.exponential(3.0, size=(t, cols))).astype(np.float32)
    x[t // 2] = 0.0  # a zero row stays zero (no division by a zero scale)
    for scale in (0.0, 0.02, float(np.abs(x).max()) / 127 * 1.5):  # dynamic, static with clipping, static wide
        q, s = act_quant.reference(x, scale)
        got = act_quant.fake_quant(x, scale)
        # the same int8 codes; values equal up to an ulp (fastmath may compute max/127 as max * (1/127))
        codes = np.rint(got / np.where(s > 0, s, 1)[:, None]).astype(np.int32)
        np.testing.assert_array_equal(codes, q.astype(np.int32))
        np.testing.assert_allclose(got, q.astype(np.float32) * s[:, None], rtol=1e-6, atol=0)
        assert np.abs(q.astype(np.int32)).max(initial=0) <= 127
        assert not got[t // 2].any()
        if scale == 0.0:  # dynamic: the largest element of each nonzero row lands exactly on ±127
            nz = np.abs(x).max(axis=1) > 0
            assert (np.abs(q[nz].astype(np.int32)).max(axis=1) == 127).all()
            assert np.abs(got - x).max() <= 0.5 * s.max() * (1 + 1e-6)


def test_kernel_takes_views():
    x = np.arange(60, dtype=np.float32).reshape(6, 10)[::2, 1:]  # strided, non-contiguous
    q, s = act_quant.reference(np.ascontiguousarray(x))
    np.testing.assert_allclose(act_quant.fake_quant(x, 0.0), q.astype(np.float32) * s[:, None], rtol=1e-6)


# ------------------------------------------------------------------------------------------------ dynamic mode
def test_dynamic_changes_logits_a_little(tiny_llama, eight_bit, llama_prompt):
    """W8A8: int8 activations add a small, nonzero error. Measured on this model (max logit error relative to the
    largest logit, against transformers): 8-bit weights 0.020, plus dynamic int8 activations 0.027; KL against the
    float model 6e-5 -> 1.1e-4. Tolerances: 0.05 and 5e-4."""
    want = hf_logits(tiny_llama, llama_prompt)
    none = logits(eight_bit["plain"], llama_prompt)
    dyn = logits(eight_bit["plain"], llama_prompt, "dynamic")
    assert 0 < rel_err(dyn, none) < 0.05
    assert rel_err(none, want) < 0.05
    assert rel_err(dyn, want) < 0.05
    assert kl(want, none) < kl(want, dyn) < 5e-4
    # one token (decode kernels) and a few (the fused small-batch kernels) are rounded too
    for n in (1, 3):
        a = logits(eight_bit["plain"], llama_prompt[:n])
        b = logits(eight_bit["plain"], llama_prompt[:n], "dynamic")
        assert 0 < rel_err(b, a) < 0.05


def test_mode_belongs_to_the_engine(eight_bit, llama_prompt):
    ids = llama_prompt[:9]
    before = logits(eight_bit["plain"], ids)
    dyn = Engine(eight_bit["plain"], ctx=64, threads=1, act_quant="dynamic")
    plain = Engine(eight_bit["plain"], ctx=64, threads=1)
    np.testing.assert_array_equal(plain.logits_all(ids), before)
    assert not np.array_equal(dyn.logits_all(ids), before)
    ws = act_quant.linear_weights(dyn.model)
    assert len(ws) == 7 * 2 + 1 and all(w.act_q == 0 for w in ws)
    assert dyn.model.embed.act_q is None  # the (untied) embedding is looked up, not multiplied
    assert all(w.act_q is None for w in act_quant.linear_weights(plain.model))
    toks = [ev.token for ev in dyn.generate(ids, max_tokens=4)]  # decode runs in the mode too
    assert len(toks) >= 1


# ------------------------------------------------------------------------------------------------ smoothquant
def test_parse_smoothquant():
    m = parse_method("rtn+smoothquant")
    assert m.smoothquant and m.calibrated and m.name == "smoothquant+rtn"
    for bad in ("smoothquant+awq", "hadamard+smoothquant+gptq"):
        with pytest.raises(LowbitError, match="use one of them"):
            parse_method(bad)


def test_smoothquant_is_exact_at_eight_bits_and_stores_scales(tiny_llama, eight_bit, llama_prompt):
    """The migration is exact in float: with act-quant none the 8-bit smoothquant container is as close to
    transformers as plain 8-bit (a wrong fold would show as a large error)."""
    want = hf_logits(tiny_llama, llama_prompt)
    plain = logits(eight_bit["plain"], llama_prompt)
    got = logits(eight_bit["sq"], llama_prompt)
    assert rel_err(got, want) < max(3 * rel_err(plain, want), 1e-2)
    c = Container(eight_bit["sq"])
    names = set(c.tensor_names)
    for i in range(2):
        for lin in LINEARS:
            t = c.tensor(f"blk.{i}.{lin}.act_scale")
            assert t.shape == (1,) and t.qtype.name == "f32"
    assert "output.act_scale" in names and "token_embd.act_scale" not in names
    assert c.meta["quantization"]["smoothquant_alpha"] == smoothquant.ALPHA
    assert summarize(c)["params"] == summarize(Container(eight_bit["plain"]))["params"]


def test_static_mode_runs_and_stays_close(tiny_llama, eight_bit, llama_prompt):
    """One calibrated scale per tensor is coarser than per-token scales on this random model (measured KL against
    transformers: 9e-4 static, 1.1e-4 dynamic); what is proven here is that it runs, changes the logits, and stays
    within a small KL (tolerance 3e-3)."""
    want = hf_logits(tiny_llama, llama_prompt)
    static = logits(eight_bit["sq"], llama_prompt, "static")
    none = logits(eight_bit["sq"], llama_prompt)
    assert rel_err(static, none) > 0
    assert kl(want, static) < 3e-3


def outlier_model(src, dst, factor=40.0, channels=(3, 17, 50)):
    """``src`` with a few hidden channels of every norm output made ``factor`` times larger and the consuming
    columns divided by it: the same function in float, but activations with outlier channels (as real LLMs have)."""
    import torch
    import transformers as tf
    from lbtest import REFSMALL, TOKENIZER_FILES

    model = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    idx = list(channels)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, lins in (
                (layer.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                (layer.post_attention_layernorm, ("gate_proj", "up_proj")),
            ):
                norm.weight[idx] *= factor
                for name in lins:
                    mod = getattr(layer.self_attn if name[0] in "qkv" else layer.mlp, name)
                    mod.weight[:, idx] /= factor
    model.save_pretrained(dst)
    import shutil

    for f in TOKENIZER_FILES:
        shutil.copy(REFSMALL / f, dst / f)
    return dst


def test_smoothquant_beats_no_migration_with_outliers(tiny_llama, tmp_path, llama_prompt, monkeypatch):
    """On a model with outlier input channels, static int8 activations with migration lose much less (KL against
    the float model) than the same static scales without it, and dynamic per-token scales too gain from it."""
    src = outlier_model(tiny_llama, tmp_path / "outliers")
    ref = logits(convert(str(src), tmp_path / "f.lowbit", ConvertOptions(bits=16), progress=False), llama_prompt)
    opts = ConvertOptions(bits=8, method="smoothquant+rtn", **CAL)
    sq = convert(str(src), tmp_path / "sq.lowbit", opts, progress=False)
    monkeypatch.setattr(smoothquant, "smoothing_scales", lambda x_max, ws, alpha=0.5: np.ones_like(x_max))
    flat = convert(str(src), tmp_path / "flat.lowbit", opts, progress=False)  # scales only, no migration
    monkeypatch.undo()
    kls = {
        "static_sq": kl(ref, logits(sq, llama_prompt, "static")),
        "static_flat": kl(ref, logits(flat, llama_prompt, "static")),
        "dynamic_sq": kl(ref, logits(sq, llama_prompt, "dynamic")),
        "dynamic_flat": kl(ref, logits(flat, llama_prompt, "dynamic")),
        "none_flat": kl(ref, logits(flat, llama_prompt)),
    }
    assert kls["static_sq"] < 0.5 * kls["static_flat"], kls
    assert kls["dynamic_sq"] < kls["dynamic_flat"], kls
    assert kls["none_flat"] < kls["dynamic_flat"], kls


# ------------------------------------------------------------------------------------------------ errors, options
def test_static_without_scales_is_a_clean_error(eight_bit):
    res = run_cli(
        "eval", eight_bit["plain"], "--text", CALIB, "--eval-ctx", "32", "--max-tokens", "64", "--act-quant", "static"
    )
    assert_clean_error(res, "no static activation scales")
    res = run_cli("generate", eight_bit["plain"], "-p", "hi", "-n", "2", "--act-quant", "static")
    assert_clean_error(res, "--act-quant dynamic")
    with pytest.raises(LowbitError, match="unknown --act-quant"):
        Engine(eight_bit["plain"], ctx=16, threads=1, act_quant="int4")


def test_eval_cli_reports_the_mode(eight_bit):
    res = run_cli(
        "eval",
        eight_bit["sq"],
        "--text",
        CALIB,
        "--eval-ctx",
        "32",
        "--max-tokens",
        "64",
        "--act-quant",
        "static",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    assert '"act_quant": "static"' in res.stdout


def test_compare_act_option():
    a, b = parse_configs("rtn:8:act=dynamic,smoothquant+rtn:8:g128:act=static")
    assert (a.act, a.label, b.act) == ("dynamic", "rtn:8:g64:act=dynamic", "static")
    assert parse_configs("rtn:8")[0].act == "none"
    for bad, needle in (("rtn:8:act=static", "needs the smoothquant"), ("rtn:8:act=int4", "choose dynamic")):
        with pytest.raises(LowbitError, match=needle):
            parse_configs(bad)
