"""lowbit tune: the PyTorch block against transformers (the numerics oracle), and tuning that lowers the error it
optimizes and the model's KL against its float teacher, with codes and types unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from lbtest import CALIB, DEV_EVAL, assert_clean_error, rel_err, run_cli
from test_gguf_import import _build

from lowbit.convert.converter import ConvertOptions, convert
from lowbit.convert.tune import TuneOptions, _block_weights, teacher_weights, tune
from lowbit.formats.qtypes import unpack_codes
from lowbit.formats.reader import Container
from lowbit.kernels.ref import dequantize
from lowbit.runtime.engine import Engine

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_the_torch_blocks_compute_what_transformers_computes(kind, tmp_path):
    """Teacher blocks (float weights) from embeddings to the final norm and lm_head: transformers' logits; student
    blocks at the stored scales: exactly the stored dequantized weights."""
    from lowbit.convert.tune_model import Block, QuantLinear, rms_norm
    from lowbit.models import FAMILIES
    from lowbit.models.common import rope_inv_freq, rope_tables

    model = _build(tmp_path / "hf", kind)
    lb = convert(str(tmp_path / "hf"), tmp_path / "m.lowbit", ConvertOptions(bits=4), progress=False)
    c = Container(lb)
    family = FAMILIES[c.meta["architecture"]["family"]]
    args = family.ModelArgs.from_dict(c.meta["architecture"]["args"])
    teacher = teacher_weights(str(tmp_path / "hf"), family, args)
    ids = np.random.default_rng(1).integers(3, 4000, size=(2, 24))
    cos, sin = rope_tables(rope_inv_freq(args.rotary_dim or args.head_dim, args.rope_theta, args.rope_scaling, 24),
                           24)  # fmt: skip
    x = torch.from_numpy(teacher["token_embd.weight"][ids])
    with torch.no_grad():
        for i in range(args.num_hidden_layers):
            x = Block(args, _block_weights(c, teacher, i, quant=False), cos, sin)(x)
        head = torch.from_numpy(teacher.get("output.weight", teacher["token_embd.weight"]))
        got = (rms_norm(x, torch.from_numpy(teacher["output_norm.weight"]), args.rms_norm_eps) @ head.T).numpy()
        want = model(torch.from_numpy(ids)).logits.numpy()
    assert rel_err(got, want) < 1e-4
    student = _block_weights(c, teacher, 0, quant=True)
    for short, mod in student.items():
        if isinstance(mod, QuantLinear):
            t = c.tensor(f"blk.0.{short}.weight")
            with torch.no_grad():
                np.testing.assert_array_equal(mod.weight().numpy(), dequantize(t.parts, t.qtype, t.shape))


def _kl(model: str, reference: str) -> float:
    import json

    res = run_cli("eval", model, "--reference", reference, "--text", DEV_EVAL, "--eval-ctx", "128", "--max-tokens",
                  "2048", "--json", "--exact-activations")  # fmt: skip
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])["kl_mean"]


def test_tuning_lowers_block_error_and_kl_and_keeps_the_codes(tiny_models, tmp_path):
    lb = convert(str(tiny_models["llama"]), tmp_path / "q.lowbit", ConvertOptions(bits=3), progress=False)
    out = tmp_path / "t.lowbit"
    report = tune(lb, out, TuneOptions(calib=str(CALIB), samples=16, seq_len=64, steps=40, time_budget=120,
                                       e2e_share=0.0), progress=False)  # fmt: skip
    assert all(s > 0 for s in report.steps) and report.e2e_kl is None
    assert all(a < b for a, b in zip(report.loss_after, report.loss_before, strict=True))
    a, b = Container(lb), Container(out)
    assert b.meta["quantization"]["tuned"]["steps_per_block"] == report.steps
    changed = 0
    for name in a.tensor_names:
        ta, tb = a.tensor(name), b.tensor(name)
        assert ta.qtype == tb.qtype
        if ta.qtype.is_float:
            np.testing.assert_array_equal(tb.parts["data"], ta.parts["data"])
            continue
        np.testing.assert_array_equal(unpack_codes(tb.parts["codes"], tb.qtype, tb.shape[1]),
                                      unpack_codes(ta.parts["codes"], ta.qtype, ta.shape[1]))  # fmt: skip
        changed += not np.array_equal(tb.parts["scales"], ta.parts["scales"])
    assert changed == 2 * 7  # every matrix of the two blocks; embeddings and lm_head as stored
    assert _kl(out, str(tiny_models["llama"])) < _kl(lb, str(tiny_models["llama"]))
    assert np.isfinite(Engine(out, ctx=64).logits_all([1, 5, 9])).all()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_end_to_end_stage_lowers_the_kl_of_the_logits(tiny_models, tmp_path, kind):
    """Every quantized matrix's scales, the embedding / lm_head's included (qwen2's tied, llama's untied), learn from
    the logits' KL against the float model: the held-out KL goes down, so does the KL on other text, codes stay."""
    src = str(tiny_models[kind])
    lb = convert(src, tmp_path / "q.lowbit", ConvertOptions(bits=3), progress=False)
    out = tmp_path / "t.lowbit"
    report = tune(lb, out, TuneOptions(calib=str(CALIB), time_budget=20, e2e_share=1.0, e2e_samples=32, e2e_len=64),
                  progress=False)
    assert report.steps == [] and report.e2e_steps > 0 and report.e2e_kept
    kl0, kl1 = report.e2e_kl
    assert kl1 < kl0
    a, b = Container(lb), Container(out)
    assert b.meta["quantization"]["tuned"]["end_to_end"]["kept"] is True
    heads = [n for n in ("token_embd.weight", "output.weight") if n in a.tensor_names]
    assert len(heads) == (2 if kind == "llama" else 1)
    for name in ("blk.1.ffn_down.weight", *heads):
        ta, tb = a.tensor(name), b.tensor(name)
        np.testing.assert_array_equal(tb.parts["codes"], ta.parts["codes"])
        assert not np.array_equal(tb.parts["scales"], ta.parts["scales"])
    assert _kl(out, src) < _kl(lb, src)


def test_bad_tune_input_is_one_line(tiny_models, tmp_path):
    lb = convert(str(tiny_models["llama"]), tmp_path / "q.lowbit", ConvertOptions(bits=4), progress=False)
    assert_clean_error(run_cli("tune", lb, "-o", tmp_path / "t.lowbit", "--calib", tmp_path / "none.txt"), "no such")
    assert_clean_error(run_cli("tune", lb, "-o", lb, "--calib", CALIB, "--force"), "input")
    assert_clean_error(run_cli("tune", lb, "-o", tmp_path / "t.lowbit", "--calib", CALIB, "--teacher",
                               tiny_models["qwen2"]), "teacher")  # fmt: skip
    assert_clean_error(run_cli("tune", lb, "-o", tmp_path / "t.lowbit", "--calib", CALIB, "--time-budget", "0"),
                       "--time-budget")
    assert_clean_error(run_cli("tune", lb, "-o", tmp_path / "t.lowbit", "--calib", CALIB, "--e2e-share", "2"),
                       "--e2e-share")
    full = convert(str(tiny_models["llama"]), tmp_path / "f.lowbit", ConvertOptions(bits=16), progress=False)
    assert_clean_error(run_cli("tune", full, "-o", tmp_path / "t.lowbit", "--calib", CALIB), "nothing to tune")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.lowbit", "q.lowbit"]


def test_a_block_that_does_worse_on_held_out_sequences_keeps_its_stored_scales(tiny_models, tmp_path):
    """Every fourth calibration sequence is held out; a fit that raises the held-out error (here: a learning rate
    that blows the scales up) is undone, and the file keeps what it stored."""
    lb = convert(str(tiny_models["llama"]), tmp_path / "q.lowbit", ConvertOptions(bits=3), progress=False)
    out = tmp_path / "t.lowbit"
    report = tune(lb, out, TuneOptions(calib=str(CALIB), samples=8, seq_len=64, steps=5, lr=50.0, time_budget=120,
                                       e2e_share=0.0), progress=False)  # fmt: skip
    assert report.kept == [False, False] and report.loss_after == pytest.approx(report.loss_before)
    a, b = Container(lb), Container(out)
    assert b.meta["quantization"]["tuned"]["blocks_kept"] == [False, False]
    for name in a.tensor_names:
        for part, arr in a.tensor(name).parts.items():
            np.testing.assert_array_equal(b.tensor(name).parts[part], arr)


def test_the_tune_method_step_converts_then_tunes(tiny_models, tmp_path):
    """``--method rtn+tune``: the rtn file, tuned against the source in the same command; codes as rtn wrote them,
    scales learned, no file left behind but the output."""
    from lowbit.errors import LowbitError

    src = str(tiny_models["llama"])
    plain = convert(src, tmp_path / "p.lowbit", ConvertOptions(bits=3, method="rtn"), progress=False)
    out = convert(src, tmp_path / "t.lowbit", ConvertOptions(bits=3, method="rtn+tune", calib=str(CALIB),
                                                             tune_seconds=30), progress=False)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.lowbit", "t.lowbit"]
    a, b = Container(plain), Container(out)
    assert b.meta["quantization"]["tuned"]["end_to_end"]["steps"] > 0
    t_a, t_b = a.tensor("blk.0.attn_q.weight"), b.tensor("blk.0.attn_q.weight")
    np.testing.assert_array_equal(t_b.parts["codes"], t_a.parts["codes"])
    assert not np.array_equal(t_b.parts["scales"], t_a.parts["scales"])
    with pytest.raises(LowbitError, match="--calib"):
        ConvertOptions(bits=3, method="gptq+tune").validate()
    with pytest.raises(LowbitError, match="lowrank"):
        ConvertOptions(bits=3, method="gptq+lowrank+tune", calib=str(CALIB)).validate()
