"""Backends as objects (kernels/ops.py): a model computes through the ops object it is given, calibration observes
through a wrapping one, and each weight's product kernels are chosen once (dispatch.Paths)."""

from __future__ import annotations

import numpy as np
import pytest
from test_kernels import QUANT, random_parts

from lowbit.formats.qtypes import REGISTRY
from lowbit.formats.reader import Container, StoredTensor
from lowbit.kernels import cpu_quant, dispatch, ref
from lowbit.kernels.ops import CpuOps, ObservingOps
from lowbit.models import family_for

PROMPT = np.array([1, 17, 90, 3, 64, 41, 7, 300, 12, 5, 8, 2])


def _model(path, ops=None, ctx=64):
    c = Container(path)
    arch = c.meta["architecture"]
    _, family = family_for(arch["model_type"])
    return family.Model(family.ModelArgs.from_dict(arch["args"]), c, ctx, ops=ops)


class Counting(CpuOps):
    """The CPU ops, counting the calls of each primitive (a backend is any object with these methods)."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __getattribute__(self, name):
        attr = super().__getattribute__(name)
        if callable(attr) and not name.startswith("_") and name not in ("calls",):
            calls = super().__getattribute__("calls")
            calls[name] = calls.get(name, 0) + 1
        return attr


def test_the_model_computes_only_through_its_ops(refsmall_containers):
    """A model given another ops object sends every step of its pass there, and gets the default's numbers."""
    plain, counted = _model(refsmall_containers[4]), _model(refsmall_containers[4], ops=Counting())
    assert isinstance(plain.ops, CpuOps)
    counted.ops.calls.clear()
    want = plain.forward(PROMPT, 0, plain.new_cache(), all_logits=True)
    got = counted.forward(PROMPT, 0, counted.new_cache(), all_logits=True)
    assert np.array_equal(got, want)
    n = counted.args.num_hidden_layers
    calls = counted.ops.calls
    assert calls["rope_and_cache"] == calls["attend"] == n
    assert calls["linears"] == 2 * n and calls["add_norm"] == 2 * n - 1
    assert calls["embedding"] == calls["forward_pass"] == calls["to_host"] == 1
    assert calls["new_cache"] == 1


def test_calibration_observes_through_a_wrapping_ops_object(refsmall_containers):
    """ObservingOps shows every product's input (q, k and v one by one) and changes no number; convert's observe()
    wraps the model's ops and puts them back."""
    from lowbit.convert.calibration import observe

    model = _model(refsmall_containers[8])
    want = model.forward(PROMPT, 0, model.new_cache(), all_logits=True)
    seen = []

    class Recorder:
        def observe(self, name, x):
            seen.append((name, x.shape))

    inner = model.ops
    undo = observe(model, Recorder())
    assert isinstance(model.ops, ObservingOps) and model.ops.inner is inner
    got = model.forward(PROMPT, 0, model.new_cache(), all_logits=True)
    undo()
    assert model.ops is inner
    assert np.array_equal(got, want)
    per_layer = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    names = [f"blk.{i}.{k}.weight" for i in range(model.args.num_hidden_layers) for k in per_layer]
    assert [n for n, _ in seen] == [*names, model.lm_head.name]
    assert all(shape[0] == len(PROMPT) for _, shape in seen)


def _weight(name: str) -> dispatch.Weight:
    qt = REGISTRY[name]
    rng = np.random.default_rng(qt.id)
    rows, cols = 2 * cpu_quant.GEMM_ROWS + 3, 9 * max(qt.group_size, 32)
    if qt.is_float:
        data = rng.standard_normal((rows, cols)).astype(np.float16 if name == "f16" else np.float32)
        st = StoredTensor("w", qt, (rows, cols), {"data": data})
    else:
        st = StoredTensor("w", qt, (rows, cols), random_parts(qt, rows, cols, rng))
    return dispatch.Weight(st)


@pytest.mark.parametrize("name", ["f32", "f16", "q4_pc", "q3a_pc", "q4a_g32", "q2_g64", "q8_g128", "q5a_g32"])
def test_each_weight_records_its_product_kernels_once(name):
    """The record names one kernel per token count; products follow it (and agree with the reference)."""
    w = _weight(name)
    paths = w.paths.names()
    if w.f32 is not None:
        assert paths == {"one": "float", "few": "float", "many": "float", "prompt": None}
    elif w.h16 is not None:
        assert paths == {"one": "half_matvec", "few": "half_small", "many": "half_tiles", "prompt": "half_tiles"}
    elif w.int_kernels is None:
        assert paths == {"one": "generic_matvec", "few": "generic_small", "many": "dequantized_tiles", "prompt": None}
    else:
        gemm = w.int_kernels.gemm is not None
        assert paths == {"one": "int_matvec", "few": "int_small", "many": "int_gemm" if gemm else "dequantized_tiles",
                         "prompt": "int_gemm" if gemm else None}
    rng = np.random.default_rng(1)
    for t in (1, 5, 12):
        x = rng.standard_normal((t, w.cols)).astype(np.float32)
        got = dispatch.linear(w, x)
        if w.is_float:
            want = x @ (w.f32 if w.f32 is not None else w.h16.view(np.float16).astype(np.float32)).T
        else:
            st = StoredTensor("w", w.qtype, (w.rows, w.cols), _parts(w))
            want = ref.matvec(st.parts, w.qtype, (w.rows, w.cols), x)
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


def _parts(w: dispatch.Weight) -> dict:
    parts = {"codes": w.codes, "scales": w.scales.view(np.float16)}
    if w.asym:
        parts["mins"] = w.mins.view(np.float16)
    return parts


@pytest.mark.skipif(not cpu_quant.HAS_BYTE_DOT, reason="packed blocks need the byte dot-product kernels")
def test_the_record_follows_packing_and_the_activation_mode():
    w = _weight("q4a_g32")
    w.set_activation_mode("int8")
    assert dispatch.pack_for_batches(w) > 0
    assert w.paths.names()["few"] == "packed_small"
    before = w.packed
    w.set_activation_mode("split")  # repacked for the new mode's kernels, and the record with it
    assert w.packed is not None and w.packed is not before and w.paths.names()["few"] == "packed_small"
    w.set_activation_mode("int16")  # no packed kernels for int16 activations
    assert w.packed is None and w.paths.names()["few"] == "int_small"


def test_quant_types_under_test_include_every_kernel_family():
    """The parametrisation above meets per-channel, grouped-integer and float weights."""
    kinds = {("float" if w.f32 is not None else "half" if w.h16 is not None else "generic" if w.int_kernels is None
              else "int") for w in map(_weight, ["f32", "f16", "q4_pc", "q4a_g32"])}  # fmt: skip
    assert kinds == {"float", "half", "generic", "int"}
    assert QUANT
