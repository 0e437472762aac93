"""Random-sign block Hadamard rotation: the numba FWHT against the explicit Sylvester reference, the convert-side
helpers, dispatch with rotated (and low-rank corrected) weights, and a converted tiny llama whose container stores
some weights rotated: parity with transformers, and broken parity when the signs are wrong or missing."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.convert import lowrank, rotation
from lowbit.convert.quantize import quantize
from lowbit.errors import FormatError, LowbitError
from lowbit.formats.qtypes import REGISTRY, get_qtype
from lowbit.formats.reader import Container, StoredTensor
from lowbit.formats.writer import ContainerWriter, TensorPlan
from lowbit.kernels import cpu_quant, dispatch, hadamard, ref

COLS = [1, 3, 64, 96, 512, 1536, 2048, 12288]


@pytest.mark.parametrize(
    ("cols", "block"), [(1, 1), (6, 2), (64, 64), (96, 32), (576, 64), (1536, 512), (4096, 4096), (14336, 2048)]
)
def test_block_size_derived_from_cols(cols, block):
    assert hadamard.block_size(cols) == block


def test_block_size_is_capped():
    assert hadamard.block_size(1 << 14) == hadamard.MAX_BLOCK == 4096


@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("t", [1, 3, 40])
def test_fwht_matches_sylvester_reference(cols, t):
    rng = np.random.default_rng(cols * 7 + t)
    signs = rotation.random_signs(cols, cols + t)
    x = rng.standard_normal((t, cols)).astype(np.float32)
    for inverse in (False, True):
        got = x.copy()
        hadamard.transform_inplace(got, signs, inverse=inverse)
        want = hadamard.reference_transform(x, signs, inverse=inverse)
        np.testing.assert_allclose(got, want, atol=2e-6 * np.sqrt(np.log2(hadamard.block_size(cols)) + 1))


@pytest.mark.parametrize("cols", [64, 96, 1536])
def test_transform_is_orthonormal(cols):
    signs = rotation.random_signs(cols, 5)
    r = hadamard.reference_matrix(signs)
    np.testing.assert_allclose(r @ r.T, np.eye(cols), atol=1e-12)
    x = np.random.default_rng(0).standard_normal((4, cols))
    xr = rotation.transform(x, signs)
    assert xr.dtype == np.float64
    np.testing.assert_allclose(xr, x @ r.T, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(xr, axis=1), np.linalg.norm(x, axis=1), rtol=1e-12)
    np.testing.assert_allclose(rotation.inverse_transform(xr, signs), x, atol=1e-12)


def test_rotated_weight_times_rotated_input_equals_original_product():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((24, 1536)).astype(np.float32)
    x = rng.standard_normal((5, 1536)).astype(np.float32)
    w_rot, signs = rotation.rotate_weight(w, seed_or_signs=11)
    np.testing.assert_array_equal(signs, rotation.random_signs(1536, 11))
    np.testing.assert_allclose(rotation.transform(x, signs) @ w_rot.T, x @ w.T, atol=2e-4)
    np.testing.assert_allclose(rotation.unrotate_weight(w_rot, signs), w, atol=1e-5)


def test_rotate_hessian_is_the_statistics_of_rotated_inputs():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 96)) * np.linspace(0.1, 5, 96)
    signs = rotation.random_signs(96, 3)
    h = x.T @ x
    xr = rotation.transform(x, signs)
    h_rot = rotation.rotate_hessian(h, signs)
    assert h_rot.dtype == np.float64
    np.testing.assert_allclose(h_rot, xr.T @ xr, rtol=1e-10, atol=1e-9 * np.abs(h).max())
    r = hadamard.reference_matrix(signs)
    np.testing.assert_allclose(h_rot, r @ h @ r.T, atol=1e-9 * np.abs(h).max())


def test_helpers_reject_bad_signs_and_shapes():
    with pytest.raises(LowbitError, match="signs"):
        rotation.rotate_weight(np.ones((2, 8)), np.array([1.0, -1.0, 0.5, 1, 1, 1, 1, 1]))
    with pytest.raises(LowbitError, match="signs"):
        rotation.transform(np.ones((2, 8)), np.ones(4))
    with pytest.raises(LowbitError, match="square"):
        rotation.rotate_hessian(np.ones((3, 4)), np.ones(4))
    with pytest.raises(LowbitError, match="2-D"):
        rotation.rotate_weight(np.ones(8), 0)
    extras = rotation.extra_tensors("blk.0.attn_q.weight", signs=np.ones(8), lowrank=(np.ones((2, 8)), np.ones((4, 2))))
    assert {k: (v.dtype, v.shape) for k, v in extras.items()} == {
        "blk.0.attn_q.had": (np.float16, (8,)),
        "blk.0.attn_q.lr_a": (np.float16, (2, 8)),
        "blk.0.attn_q.lr_b": (np.float16, (4, 2)),
    }


# ------------------------------------------------------------------------------------------------ dispatch


def _qweight(rng, rows, cols, qname="q4a_g32"):
    qt = REGISTRY[qname]
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    return qt, quantize(w, qt, "rtn")


@pytest.mark.parametrize("t", [1, 3, 9, 40])
@pytest.mark.parametrize("cols", [96, 512])
def test_linear_with_rotation_and_lowrank_matches_reference(t, cols):
    rng = np.random.default_rng(t + cols)
    rows = 13
    qt, parts = _qweight(rng, rows, cols)
    signs = rotation.random_signs(cols, t)
    a = rng.standard_normal((3, cols)).astype(np.float16)
    b = rng.standard_normal((rows, 3)).astype(np.float16)
    bias = rng.standard_normal(rows).astype(np.float32)
    st = StoredTensor("w.weight", qt, (rows, cols), parts)
    w = dispatch.Weight(st, bias, had_signs=signs.astype(np.float16), lr_a=a, lr_b=b)
    x = rng.standard_normal((t, cols)).astype(np.float32)
    xr = hadamard.reference_transform(x, signs)
    xp = xr.astype(np.float32)
    if w.act_mode == "int8":  # the quantized product takes the rotated input rounded to int8 (test_kernels.py)
        xp = ref.round_activations(xp, w.g, cpu_quant.XQ_MAX_INT8)
    want = ref.matvec(parts, qt, (rows, cols), xp) + (xr @ a.T.astype(np.float64)) @ b.T + bias
    got = dispatch.linear(w, x)
    # int8: the rotation's last bits can move an element to the neighbouring level (one 1/127 step)
    tol = 5e-3 if w.act_mode == "int8" else 1e-4
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
    x_before = x.copy()
    dispatch.linear(w, x)
    np.testing.assert_array_equal(x, x_before)  # the input is not transformed in place


def test_float_weight_rotation_and_embedding_rows():
    """A float weight stored rotated with a low-rank term: linear gives W x, embed gives the rows of W."""
    rng = np.random.default_rng(4)
    rows, cols = 10, 96
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w_rot, signs = rotation.rotate_weight(w, 3)
    a = rng.standard_normal((2, cols)).astype(np.float16)
    b = rng.standard_normal((rows, 2)).astype(np.float16)
    stored = (w_rot - b.astype(np.float32) @ a.astype(np.float32)).astype(np.float32)  # stored + b a = W'
    st = StoredTensor("e.weight", get_qtype("f32"), (rows, cols), {"data": stored})
    wt = dispatch.Weight(st, had_signs=signs, lr_a=a, lr_b=b)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    np.testing.assert_allclose(dispatch.linear(wt, x), x @ w.T, atol=1e-4)
    ids = np.array([0, 7, 3, 7])
    np.testing.assert_allclose(dispatch.embed(wt, ids), w[ids], atol=1e-5)
    # quantized embedding: rows of the dequantized stored matrix, rotated back
    qt, parts = _qweight(rng, rows, cols, "q8_g32")
    qw = dispatch.Weight(StoredTensor("e.weight", qt, (rows, cols), parts), had_signs=signs)
    want = hadamard.reference_transform(ref.dequantize(parts, qt, (rows, cols))[ids], signs, inverse=True)
    np.testing.assert_allclose(dispatch.embed(qw, ids), want, atol=1e-5)


def test_weight_rejects_bad_extras():
    rng = np.random.default_rng(5)
    qt, parts = _qweight(rng, 8, 64)
    st = StoredTensor("blk.0.attn_q.weight", qt, (8, 64), parts)
    with pytest.raises(FormatError, match=r"blk\.0\.attn_q\.had: expected 64 Hadamard signs"):
        dispatch.Weight(st, had_signs=np.ones(32))
    with pytest.raises(FormatError, match="must all be"):
        dispatch.Weight(st, had_signs=np.full(64, 0.5))
    with pytest.raises(FormatError, match=r"blk\.0\.attn_q\.lr_a: expected shape \[rank, 64\]"):
        dispatch.Weight(st, lr_a=np.ones((2, 63)), lr_b=np.ones((8, 2)))
    with pytest.raises(FormatError, match=r"lr_b: expected shape \[8, 2\]"):
        dispatch.Weight(st, lr_a=np.ones((2, 64)), lr_b=np.ones((8, 3)))
    with pytest.raises(FormatError, match="no matching"):
        dispatch.Weight(st, lr_a=np.ones((2, 64)))


# ------------------------------------------------------------------------------------------------ end to end

HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_v": "self_attn.v_proj", "ffn_down": "mlp.down_proj"}


def _hf_weights(folder) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v.astype(np.float32) for k, v in load_file(str(folder / "model.safetensors")).items()}


def _hf_name(name: str) -> str:
    if name == "output":
        return "lm_head.weight"
    _, layer, kind = name.split(".")
    return f"model.layers.{layer}.{HF_NAMES[kind]}.weight"


def rewrite(src: Container, dst, tensors: dict[str, tuple[str, dict]], drop=lambda name: False) -> Container:
    """Copy ``src`` to ``dst`` with ``tensors`` (name -> (qtype name, parts)) replaced or added and the tensors
    ``drop(name)`` selects left out."""
    entries = {n: (src.tensor(n).qtype.name, src.tensor(n).parts) for n in src.tensor_names if not drop(n)}
    entries.update(tensors)
    meta = {k: v for k, v in src.meta.items() if k not in ("tensors", "blobs", "format")}
    plans = []
    for n, (q, parts) in entries.items():
        shape = parts["data"].shape if "data" in parts else src.tensor(n).shape
        plans.append(TensorPlan(n, get_qtype(q), tuple(shape)))
    with ContainerWriter(dst, meta, plans, src.blobs()) as w:
        for n, (_, parts) in entries.items():
            w.write_tensor(n, parts)
    return Container(dst)


def _f16(arr) -> tuple[str, dict]:
    return "f16", {"data": np.ascontiguousarray(arr, dtype=np.float16)}


@pytest.fixture(scope="module")
def e2e(tiny_models, tmp_path_factory):
    """A tiny llama at 8 bits, and a variant with rotated and low-rank corrected weights (see below)."""
    from lowbit.convert.converter import ConvertOptions, convert

    folder = tiny_models["llama"]
    root = tmp_path_factory.mktemp("had")
    base = Container(convert(str(folder), root / "m8.lowbit", ConvertOptions(bits=8), progress=False))
    hf = _hf_weights(folder)
    q8, q3 = get_qtype("q8_g32"), get_qtype("q3a_g32")
    new: dict[str, tuple[str, dict]] = {}
    signs: dict[str, np.ndarray] = {}
    # rotated at 8 bits: attn_q (cols 64: one block), ffn_down of layer 1 (cols 96: blocks of 32), lm_head
    for i, name in enumerate(("blk.0.attn_q", "blk.1.ffn_down", "output")):
        w_rot, signs[name] = rotation.rotate_weight(hf[_hf_name(name)], seed_or_signs=100 + i)
        new[f"{name}.weight"] = (q8.name, quantize(w_rot, q8))
        new[f"{name}.had"] = _f16(signs[name])
    # 3 bits + a full-rank correction: blk.1.attn_v unrotated, blk.0.ffn_down rotated (the correction lives in the
    # rotated basis)
    for name, rotate in (("blk.1.attn_v", False), ("blk.0.ffn_down", True)):
        w = hf[_hf_name(name)]
        if rotate:
            w, signs[name] = rotation.rotate_weight(w, seed_or_signs=7)
            new[f"{name}.had"] = _f16(signs[name])
        parts = quantize(w, q3)
        a, b = lowrank.lowrank_correction(w, ref.dequantize(parts, q3, w.shape), rank=min(w.shape))
        new[f"{name}.weight"] = (q3.name, parts)
        new[f"{name}.lr_a"], new[f"{name}.lr_b"] = _f16(a), _f16(b)
    mod = rewrite(base, root / "mod.lowbit", new)
    return {"folder": folder, "root": root, "base": base, "mod": mod, "new": new, "signs": signs}


def hf_logits(folder, ids) -> np.ndarray:
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _logits(path, prompt):
    from lowbit.runtime.engine import Engine

    return Engine(path, ctx=64).logits_all(prompt)


def _rel_err(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


PROMPT = [1, 450, 3000, 17, 99, 1024, 7, 8, 9, 10, 2000, 33]


def test_rotated_and_corrected_container_matches_transformers(e2e):
    want = hf_logits(e2e["folder"], PROMPT)
    mod = e2e["mod"]
    assert "blk.0.attn_q.had" in mod and "blk.0.ffn_down.lr_a" in mod
    assert _rel_err(_logits(mod.path, PROMPT), want) < 3e-2
    # decode path (one token at a time) agrees with prefill; with int16-precision activations, because int8 ones
    # round the two paths' inputs independently (a float-order difference can move a value one level: on a host
    # without AMX, 2 of 49,152 logits then differed by 1.2e-3 of the largest)
    from lowbit.runtime.engine import Engine

    eng = Engine(mod.path, ctx=64, exact_activations=True)
    steps = [eng.prefill(PROMPT[:1])] + [eng.step(t) for t in PROMPT[1:]]
    np.testing.assert_allclose(np.stack(steps), eng.logits_all(PROMPT), atol=1e-3 * np.abs(want).max())


def test_wrong_or_missing_signs_break_parity(e2e):
    want = hf_logits(e2e["folder"], PROMPT)
    good = _rel_err(_logits(e2e["mod"].path, PROMPT), want)
    flipped = e2e["signs"]["output"].copy()
    flipped[32:] *= -1
    bad = rewrite(e2e["mod"], e2e["root"] / "flip.lowbit", {"output.had": _f16(flipped)})
    assert _rel_err(_logits(bad.path, PROMPT), want) > max(0.2, 10 * good)
    # without any .had the rotated weights are used unrotated
    drop = rewrite(e2e["mod"], e2e["root"] / "nohad.lowbit", {}, drop=lambda n: n.endswith(".had"))
    assert _rel_err(_logits(drop.path, PROMPT), want) > max(0.2, 10 * good)


def test_missing_lowrank_correction_hurts(e2e):
    want = hf_logits(e2e["folder"], PROMPT)
    drop = rewrite(e2e["mod"], e2e["root"] / "nolr.lowbit", {}, drop=lambda n: ".lr_" in n)
    assert _rel_err(_logits(drop.path, PROMPT), want) > 2 * _rel_err(_logits(e2e["mod"].path, PROMPT), want)


def test_mismatched_lowrank_shape_is_a_format_error(e2e):
    from lowbit.runtime.engine import Engine

    bad = rewrite(e2e["mod"], e2e["root"] / "badlr.lowbit", {"blk.1.attn_v.lr_b": _f16(np.zeros((31, 32)))})
    with pytest.raises(FormatError, match=r"blk\.1\.attn_v\.lr_b: expected shape"):
        Engine(bad.path, ctx=64)
    bad = rewrite(e2e["mod"], e2e["root"] / "badhad.lowbit", {"blk.0.attn_q.had": _f16(np.ones(32))})
    with pytest.raises(FormatError, match=r"blk\.0\.attn_q\.had"):
        Engine(bad.path, ctx=64)
