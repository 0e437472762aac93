"""The kernels' activation precision on whole models: int8 activations below 8 bits by default (llama.cpp's Q8
activations), ``--exact-activations`` for int16 precision; both against the portable int16 path."""

from __future__ import annotations

import numpy as np
import pytest
from lbtest import rel_err, run_cli

from lowbit.convert.converter import ConvertOptions, convert
from lowbit.kernels import act_quant, cpu_quant
from lowbit.runtime.engine import Engine


@pytest.fixture(scope="module")
def four_bit(tiny_llama, tmp_path_factory):
    # 8-bit embeddings: the test checks both widths' activation modes
    return convert(str(tiny_llama), tmp_path_factory.mktemp("ka") / "q4.lowbit", ConvertOptions(bits=4, embed_bits=8),
                   progress=False)


def _modes(engine, bits=None) -> set:
    return {w.act_mode for w in act_quant.linear_weights(engine.model)
            if w.int_kernels is not None and (bits is None or w.bits == bits)}


def _int16_logits(path, ids):
    eng = Engine(path, ctx=128, threads=1, kv="32")  # float32 caches here: float16 rounding would hide the modes
    for w in act_quant.linear_weights(eng.model):
        w.set_activation_mode("int16")
    return eng.logits_all(ids), eng


def test_exact_activations_match_the_int16_path_and_int8_stays_close(four_bit, llama_prompt):
    ids = llama_prompt
    ref, eng16 = _int16_logits(four_bit, ids)
    assert _modes(eng16) == {"int16"}
    exact = Engine(four_bit, ctx=128, threads=1, exact_activations=True, kv="32")
    default = Engine(four_bit, ctx=128, threads=1, kv="32")
    got_exact, got_default = exact.logits_all(ids), default.logits_all(ids)
    assert rel_err(got_exact, ref) < 1e-4  # split == int16 up to summation order
    if cpu_quant.HAS_BYTE_DOT:  # VNNI, or AVX2 (whose 8-bit weights and exact mode keep int16: the same numbers)
        wide = "split" if cpu_quant.HAS_VNNI else "int16"
        assert _modes(exact) == {wide} and _modes(default, 4) == {"int8"} and _modes(default, 8) == {wide}
        err = rel_err(got_default, ref)
        assert 1e-4 < err < 3e-2  # int8 activations really round, and stay close
    # decode (one token at a time) agrees with the prompt path in each mode
    for eng, full in ((exact, got_exact), (default, got_default)):
        eng.reset()
        rows = [eng.prefill(ids[:1])] + [eng.step(t) for t in ids[1:]]
        assert rel_err(np.stack([np.reshape(r, -1) for r in rows]), full) < 3e-2


def test_cli_takes_exact_activations(four_bit, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    res = run_cli("eval", str(four_bit), "--text", str(text), "--eval-ctx", "32", "--exact-activations", "--json")
    assert res.returncode == 0, res.stderr


def test_calibrated_conversion_does_not_depend_on_the_cpus_activation_mode(tiny_llama, tmp_path, monkeypatch):
    """GPTQ runs the already-quantized layers to calibrate the next ones; those products use int16-precision
    activations, so a CPU without the byte dot product (int16 everywhere) writes the same codes, up to the rare
    rounding decisions that summation order moves (GPTQ's error feedback carries them along a row)."""
    from lbtest import CAL

    from lowbit.formats.reader import Container

    opts = dict(bits=3, method="gptq", **CAL)
    a = convert(str(tiny_llama), tmp_path / "a.lowbit", ConvertOptions(**opts), progress=False)
    monkeypatch.setattr(cpu_quant, "activation_mode", lambda bits, exact=False: "int16")
    b = convert(str(tiny_llama), tmp_path / "b.lowbit", ConvertOptions(**opts), progress=False)
    ca, cb = Container(a), Container(b)
    same = {n: float(np.mean(ca.tensor(n).parts["codes"] == cb.tensor(n).parts["codes"]))
            for n in ca.tensor_names if "codes" in ca.tensor(n).parts}
    # (calibrating on int8 products instead leaves 77-89% of the codes of most matrices equal; with int16 ones the
    # least equal matrix is the lm_head, whose rows each keep the best of GPTQ/search/RTN: a row whose choice moves
    # changes all its codes — 92.7% equal since attention sums in a fixed order, above 95% before)
    assert min(same.values()) > 0.9 and np.median(list(same.values())) > 0.999, same
