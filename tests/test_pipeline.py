"""The calibrated conversion path end to end on tiny random models: every method step yields a valid container that
runs, transforms folded into the model are exact (8-bit stays as close to transformers as plain 8-bit), recipes and
budgets are honoured, bad options fail cleanly."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from lbtest import CAL, CALIB, assert_clean_error, hf_logits, rel_err, run_cli

from lowbit.convert.converter import ConvertOptions, convert
from lowbit.convert.methods import parse_method
from lowbit.errors import LowbitError
from lowbit.formats.reader import Container
from lowbit.formats.summary import summarize
from lowbit.runtime.engine import Engine


def logits(path, ids):
    return Engine(path, ctx=128, threads=1).logits_all(ids)


def test_parse_method():
    assert parse_method("gptq").rounding == "gptq"
    m = parse_method("lowrank+gptq+hadamard")
    assert (m.rounding, m.hadamard, m.lowrank, m.name) == ("gptq", True, True, "hadamard+gptq+lowrank")
    assert parse_method("awq").rounding == "search" and parse_method("awq").calibrated
    assert not parse_method("search").calibrated
    for bad, needle in [
        ("gptq+rtn", "choose one"),
        ("foo", "unknown method step"),
        ("gptq+", "steps joined"),
        ("awq+hadamard", "use one"),
        ("gptq+gptq", "repeated"),
    ]:
        with pytest.raises(LowbitError, match=needle):
            parse_method(bad)


@pytest.mark.parametrize("method", ["awq", "hadamard+gptq", "awq+gptq+lowrank"])
def test_exact_transforms_keep_eight_bit_close_to_transformers(method, tiny_llama, tmp_path, llama_prompt):
    """At 8 bits the rounding error is tiny_llama, so any mistake in folding AWQ scales, rotating weights (and applying
    the inverse at run time) or adding the low-rank term would show as a large logit error."""
    want = hf_logits(tiny_llama, llama_prompt)
    plain = logits(
        convert(str(tiny_llama), tmp_path / "plain.lowbit", ConvertOptions(bits=8), progress=False), llama_prompt
    )
    out = convert(
        str(tiny_llama),
        tmp_path / "m.lowbit",
        ConvertOptions(bits=8, method=method, lowrank_bpw=0.5, **CAL),
        progress=False,
    )
    got = logits(out, llama_prompt)
    assert rel_err(got, want) < max(3 * rel_err(plain, want), 1e-2)
    c = Container(out)
    q = c.meta["quantization"]
    assert q["method"] == parse_method(method).name and q["calibration"]["samples"] == 6
    names = set(c.tensor_names)
    if "hadamard" in method:
        assert "blk.0.attn_q.had" in names and "blk.1.ffn_down.had" in names
    if "lowrank" in method:
        assert any(n.endswith(".lr_a") for n in names)
    if "awq" in method:
        assert q["awq_alpha"]
    # a file whose weights carry extra tensors is major version 2, so older readers refuse it instead of misreading
    has_extras = "hadamard" in method or "lowrank" in method
    assert c.meta["format"]["version"][0] == (2 if has_extras else 1)


def test_gptq_beats_rtn_at_two_bits_on_calibration_text(tiny_llama, tmp_path, llama_prompt):
    want = logits(
        convert(str(tiny_llama), tmp_path / "f.lowbit", ConvertOptions(bits=16), progress=False), llama_prompt
    )
    errs = {}
    for method in ("rtn", "gptq"):
        out = convert(
            str(tiny_llama),
            tmp_path / f"{method}.lowbit",
            ConvertOptions(bits=2, group_size=32, method=method, **CAL),
            progress=False,
        )
        errs[method] = float(np.mean((logits(out, llama_prompt) - want) ** 2))
    assert errs["gptq"] < errs["rtn"], errs


def test_max_size_is_the_whole_file(tiny_llama, tmp_path):
    """--max-size bounds the file, header and tokenizer included, not only its tensors."""
    plain = convert(str(tiny_llama), tmp_path / "plain.lowbit", ConvertOptions(bits=4, group_size=32), progress=False)
    limit = int(os.path.getsize(plain) * 0.9)
    out = convert(str(tiny_llama), tmp_path / "fit.lowbit", ConvertOptions(max_size=limit, method="imatrix", **CAL),
                  progress=False)  # fmt: skip
    size = os.path.getsize(out)
    mixed = Container(out).meta["quantization"]["mixed"]
    assert size <= limit and mixed["max_size"] == limit and mixed["bytes"] < size
    assert size > 0.8 * limit  # the margin kept for the header is small


@pytest.mark.parametrize("method,extra", [("hadamard+imatrix", {}), ("imatrix+lowrank", {"lowrank_bpw": 1.0})])
def test_target_bpw_counts_the_methods_extra_tensors(tiny_llama, tmp_path, method, extra):
    """Rotation signs and low-rank factors are tensors of the file: the budget pays for them (a SmolLM2 file for
    --target-bpw 3.5 --method hadamard+gptq came out at 3.517 bits per weight before)."""
    out = convert(str(tiny_llama), tmp_path / "m.lowbit", ConvertOptions(target_bpw=4.0, method=method, **CAL, **extra),
                  progress=False)
    c = Container(out)
    s = summarize(c)
    assert any(n.endswith((".had", ".lr_a")) for n in c.tensor_names)
    assert 3.9 < s["bpw_all"] <= 4.0 + 1e-9
    assert c.meta["quantization"]["mixed"]["bpw"] == pytest.approx(s["bpw_all"], abs=1e-3)


def test_target_bpw_is_met_and_recipe_reproduces_it(tiny_llama, tmp_path, llama_prompt):
    out = convert(
        str(tiny_llama),
        tmp_path / "mix.lowbit",
        ConvertOptions(target_bpw=4.0, method="imatrix", **CAL),
        progress=False,
    )
    c = Container(out)
    s = summarize(c)
    assert s["bpw_all"] <= 4.0 + 1e-9
    recipe = c.meta["quantization"]["recipe"]
    types = {recipe[n] for n in recipe if n.endswith(".weight") and "norm" not in n}
    assert len(types) > 1, types  # really mixed
    assert any(t.endswith("s8") for t in types), types  # a budget codes its group scales in 8 bits by default
    assert c.meta["quantization"]["mixed"]["bpw"] == pytest.approx(s["bpw_all"], abs=1e-3)
    rfile = tmp_path / "recipe.json"
    res = run_cli("inspect", out, "--save-recipe", rfile)
    assert res.returncode == 0, res.stderr
    assert json.loads(rfile.read_text()) == recipe
    again = convert(
        str(tiny_llama),
        tmp_path / "again.lowbit",
        ConvertOptions(method="imatrix", recipe=str(rfile), **CAL),
        progress=False,
    )
    assert Container(again).meta["quantization"]["recipe"] == recipe
    np.testing.assert_allclose(logits(again, llama_prompt), logits(out, llama_prompt), rtol=1e-5, atol=1e-5)


def test_cli_says_which_calibration_text(tiny_llama, tmp_path):
    res = run_cli(
        "convert",
        tiny_llama,
        "-o",
        tmp_path / "c.lowbit",
        "--no-progress",
        "--method",
        "imatrix",
        "--calib",
        CALIB,
        "--calib-samples",
        "3",
        "--calib-len",
        "32",
    )
    assert res.returncode == 0, res.stderr
    assert "method imatrix; calibration: 3 sequences of 32 tokens from calib.txt" in res.stdout
    res = run_cli(
        "convert",
        tiny_llama,
        "-o",
        tmp_path / "s.lowbit",
        "--no-progress",
        "--method",
        "imatrix",
        "--calib-samples",
        "2",
        "--calib-len",
        "16",
        "--seed",
        "7",
    )
    assert res.returncode == 0, res.stderr
    assert "2 sequences of 16 tokens sampled from the unquantized model (seed 7)" in res.stdout


def test_sampled_calibration_is_seeded(tiny_llama, tmp_path):
    opts = dict(bits=4, method="imatrix", calib_samples=2, calib_len=24)
    a = convert(str(tiny_llama), tmp_path / "a.lowbit", ConvertOptions(seed=3, **opts), progress=False)
    b = convert(str(tiny_llama), tmp_path / "b.lowbit", ConvertOptions(seed=3, **opts), progress=False)
    info = Container(a).meta["quantization"]["calibration"]
    assert info["seed"] == 3 and "sampled" in info["source"]
    ca, cb = Container(a), Container(b)
    for n in ca.tensor_names:
        for part, arr in ca.tensor(n).parts.items():
            np.testing.assert_array_equal(arr, cb.tensor(n).parts[part])


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--method", "gptq+awq+rtn"], "choose one of"),
        (["--method", "gptq", "--calib", "/nonexistent.txt"], "no such file"),
        (["--target-bpw", "0.5"], "--target-bpw"),
        (["--target-bpw", "1.2", "--calib", str(CALIB), "--calib-samples", "2", "--calib-len", "16"], "budget"),
        (["--recipe", "/nonexistent.json"], "no such file"),
        (["--bits", "16", "--method", "gptq"], "need --bits below 16"),
        (["--scale-bits", "8", "--group-size", "0"], "per-channel and per-tensor scales stay float16"),
        (["--scale-bits", "8", "--bits", "8"], "--bits 8 keeps float16 scales"),
    ],
)
def test_cli_errors(tiny_llama, tmp_path, extra, needle):
    out = tmp_path / "x.lowbit"
    res = run_cli("convert", tiny_llama, "-o", out, "--no-progress", *extra)
    assert_clean_error(res, needle)
    assert not out.exists() and not list(tmp_path.glob(".x.lowbit*"))


def test_recipe_errors(tiny_llama, tmp_path):
    bad = tmp_path / "r.json"
    for content, needle in [
        ("{", "not a JSON"),
        ('{"nope.weight": "q4_g64"}', "does not have"),
        ('{"blk.0.attn_q.weight": "q9_g64"}', "blk.0.attn_q.weight"),
        ("[1]", "expected a JSON"),
    ]:
        bad.write_text(content)
        with pytest.raises(LowbitError, match=needle):
            convert(str(tiny_llama), tmp_path / "x.lowbit", ConvertOptions(recipe=str(bad)), progress=False)
