"""`lowbit export`: a .lowbit file as a GGUF. Oracles: gguf-py's dequantization (every exported tensor equals
lowbit's numbers), transformers' GGUF loader (an independent reader of the file: its logits equal lowbit's), the
real model's own llama.cpp GGUF (imported and exported again: the same bytes and keys), and lowbit's GGUF import
(the round trip gives the same logits)."""

from __future__ import annotations

import numpy as np
import pytest
from lbtest import CAL, DEV_EVAL, REFSMALL, SHARED, assert_clean_error, rel_err, run_cli

from lowbit.convert.converter import ConvertOptions, convert
from lowbit.convert.gguf_encode import encode, gguf_type, requantize
from lowbit.convert.gguf_export import export_gguf
from lowbit.convert.gguf_vocab import pre_name
from lowbit.errors import LowbitError
from lowbit.formats.qtypes import REGISTRY, pack_codes
from lowbit.formats.reader import Container
from lowbit.kernels.ref import dequantize
from lowbit.runtime.engine import Engine

SMOL = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DESCRIPTIVE = {"general.name", "general.type", "general.basename", "general.finetune", "general.languages",
               "general.license", "general.organization", "general.size_label", "GGUF.kv_count"}  # fmt: skip


def _gguf_dequantize(blocks: np.ndarray, kind: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gg_dequantize

    return gg_dequantize(blocks, GGMLQuantizationType[kind])


@pytest.mark.parametrize("cols", [96, 128, 256])
def test_every_type_exports_to_the_numbers_lowbit_computes(cols):
    """Random codes, scales and mins of every quantized type: the GGUF blocks dequantize (by gguf-py) to lowbit's
    float32 numbers bit for bit where the type maps exactly; the rest (asymmetric 6/8 bits, groups that are not
    whole blocks) are re-quantized to Q8_0 closely."""
    rng = np.random.default_rng(cols)
    rows = 5
    seen_exact = set()
    for name, qt in REGISTRY.items():
        if qt.is_float or qt.per_tensor or qt.coded_scales or qt.check_shape((rows, cols)) is not None:
            continue  # per-tensor and coded-scale types export as their twins (test_per_tensor_and_coded_...)
        ng = cols // qt.layout_group(cols)
        parts = {"codes": pack_codes(rng.integers(0, qt.max_code + 1, (rows, cols)), qt),
                 "scales": (rng.standard_normal((rows, ng)) * 0.05).astype(np.float16)}  # fmt: skip
        if qt.asym:
            parts["mins"] = (rng.standard_normal((rows, ng)) * 0.1).astype(np.float16)
        want = dequantize(parts, qt, (rows, cols))
        kind, exact = gguf_type(qt, (rows, cols))
        if exact:
            got = _gguf_dequantize(encode(parts, qt, (rows, cols), kind), kind)
            np.testing.assert_array_equal(got, want, err_msg=name)
            seen_exact.add(kind)
        else:
            assert kind == "Q8_0" and (qt.asym and qt.bits in (6, 8)), name
            got = _gguf_dequantize(requantize(want, kind), kind)
            block_max = np.abs(want).reshape(rows, -1, 32).max(-1, keepdims=True)  # Q8_0: half a step of max/127
            err = np.abs(got - want).reshape(rows, -1, 32)
            assert (err <= block_max * (0.5 / 127 + 1e-3)).all(), name
    assert seen_exact == {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}


def _fields(path) -> dict:
    from gguf import GGUFReader

    def value(f):
        try:
            return f.contents()
        except Exception:  # noqa: BLE001 - compared as absent
            return None

    r = GGUFReader(path)
    return {k: value(f) for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


def test_the_real_models_gguf_imports_and_exports_to_the_same_bytes(tmp_path):
    """SmolLM2's llama.cpp Q4_1 GGUF imported without re-rounding and exported again: every tensor has the same
    type, shape and bytes (q/k rows permuted back), and every key llama.cpp reads the same value (tokenizer, chat
    template, special ids, hyper-parameters); only descriptive general.* keys are not carried."""
    lb = convert(str(SMOL), tmp_path / "s.lowbit", ConvertOptions(), progress=False)
    report = export_gguf(lb, tmp_path / "s.gguf", strict=True)
    assert not report.inexact
    want_fields, want = _fields(SMOL)
    got_fields, got = _fields(tmp_path / "s.gguf")
    for key in set(want_fields) | set(got_fields):
        if key not in DESCRIPTIVE:
            assert got_fields.get(key) == want_fields.get(key), key
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].tensor_type == t.tensor_type and list(got[name].shape) == list(t.shape), name
        assert np.array_equal(np.asarray(got[name].data), np.asarray(t.data)), name


@pytest.fixture(scope="module")
def toy_gptq(tmp_path_factory):
    """refsmall by GPTQ at 4 bits in groups of 32, GGUF-compatible, exported strictly and imported back."""
    root = tmp_path_factory.mktemp("export")
    lb = convert(str(REFSMALL), root / "g.lowbit",
                 ConvertOptions(bits=4, group_size=32, method="gptq", gguf_compatible=True, **CAL), progress=False)
    gg = root / "g.gguf"
    report = export_gguf(lb, gg, strict=True)
    back = convert(str(gg), root / "back.lowbit", ConvertOptions(), progress=False)
    return lb, gg, back, report


def test_gptq_export_is_exact_tensor_by_tensor(toy_gptq):
    """Each tensor of the GGUF, dequantized by gguf-py (and its q/k rows un-permuted), equals lowbit's dequantized
    tensor bit for bit; the types are the GGUF's own (4-bit groups with a min -> Q4_1, 8-bit embeddings -> Q8_0)."""
    from lowbit.convert.gguf_source import GGUFSource

    lb, gg, _, report = toy_gptq
    assert not report.inexact
    assert {(lt, gt) for lt, gt, _ in report.tensors.values()} == {("f32", "F32"), ("q4a_g32", "Q4_1"),
                                                                   ("q8_g32", "Q8_0")}  # fmt: skip
    c, src = Container(lb), GGUFSource(gg)
    try:
        assert sorted(src.names()) == sorted(c.tensor_names)
        for name in c.tensor_names:
            t = c.tensor(name)
            want = dequantize(t.parts, t.qtype, t.shape)
            _, got = src.raw(name)
            np.testing.assert_array_equal(got, want, err_msg=name)
    finally:
        src.close()


def test_gptq_round_trip_gives_the_same_logits(toy_gptq):
    """The GGUF imported back computes what the lowbit file computes (KL <= 1e-6 on real text, exact activations
    on both; the import keeps every tensor exact)."""
    lb, _, back, _ = toy_gptq
    assert set(Container(back).meta["quantization"]["import"].values()) == {"exact"}
    a, b = Engine(lb, ctx=256, exact_activations=True), Engine(back, ctx=256, exact_activations=True)
    ids = [1, *a.tokenizer.encode(DEV_EVAL.read_text(encoding="utf-8"), add_special_tokens=False)[:255]]
    assert ids == [1, *b.tokenizer.encode(DEV_EVAL.read_text(encoding="utf-8"), add_special_tokens=False)[:255]]
    la, lb_ = a.logits_all(ids).astype(np.float64), b.logits_all(ids).astype(np.float64)
    pa = np.exp(la - la.max(-1, keepdims=True))
    pa /= pa.sum(-1, keepdims=True)
    lpa = np.log(pa)
    lpb = lb_ - lb_.max(-1, keepdims=True)
    lpb -= np.log(np.exp(lpb).sum(-1, keepdims=True))
    assert float((pa * (lpa - lpb)).sum(-1).mean()) <= 1e-6


def _lowbit_and_transformers_logits(lb, gg, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of 31 random tokens from transformers' GGUF loader reading ``gg`` and from lowbit running ``lb``
    (exact activations, float32 cache)."""
    import torch
    import transformers as tf

    ids = [1, *np.random.default_rng(seed).integers(3, 4000, size=30).tolist()]
    want = Engine(lb, ctx=64, kv="32", exact_activations=True).logits_all(ids)
    model = tf.AutoModelForCausalLM.from_pretrained(gg.parent, gguf_file=gg.name, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].numpy()
    return got, want


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_transformers_reads_the_exported_gguf_as_lowbit_computes_it(kind, tiny_models, tmp_path):
    """transformers' own GGUF loader (gguf-py dequantization, its own q/k un-permutation, the hyper-parameters from
    the keys it reads, tied embeddings) gives the logits lowbit computes from the .lowbit file."""
    lb = convert(str(tiny_models[kind]), tmp_path / "m.lowbit", ConvertOptions(bits=8, group_size=32),
                 progress=False)
    gg = tmp_path / "m.gguf"
    export_gguf(lb, gg, strict=True)
    assert rel_err(*_lowbit_and_transformers_logits(lb, gg, seed=3)) < 1e-4


@pytest.mark.parametrize("group_size,scale_bits,name", [(-1, 16, "q4a_pt"), (32, 8, "q4a_g32s8")])
def test_per_tensor_and_coded_scale_types_export_exactly_and_compute_as_transformers_reads_them(
        group_size, scale_bits, name, tiny_models, tmp_path):  # fmt: skip
    """A per-tensor file (one scale and min per matrix) and a coded-scale one (8-bit scale and min codes): their
    kernels (the float16 twin's, with the scale repeated or decoded) give the logits transformers computes from the
    strict GGUF export (Q4_1 blocks holding those float16 values)."""
    lb = convert(str(tiny_models["llama"]), tmp_path / "m.lowbit",
                 ConvertOptions(bits=4, group_size=group_size, embed_bits=4, scale_bits=scale_bits), progress=False)
    c = Container(lb)
    quantized = [c.tensor(n) for n in c.tensor_names if not c.tensor(n).qtype.is_float]
    assert quantized and {t.qtype.name for t in quantized} == {name}
    if group_size == -1:
        assert all(t.parts["scales"].shape == (1, 1) == t.parts["mins"].shape for t in quantized)
    else:
        assert all(t.parts["scales"].dtype == np.uint8 == t.parts["mins"].dtype for t in quantized)
    gg = tmp_path / "m.gguf"
    report = export_gguf(lb, gg, strict=True)
    assert (name, "Q4_1", True) in set(report.tensors.values())
    assert rel_err(*_lowbit_and_transformers_logits(lb, gg, seed=4)) < 1e-4


def test_llama3_rope_scaling_becomes_llama_cpps_rope_freqs(tiny_models, tmp_path):
    """Llama 3's rope scaling is written as llama.cpp's converter writes it (the rope_freqs tensor of frequency
    divisors; transformers' GGUF loader does not read it, so lowbit's import is the oracle here): same factors as
    llama.cpp's formula, same logits after the round trip."""
    from gguf_tiny import _llama3_factors
    from lbtest import tiny_config

    lb = convert(str(tiny_models["llama3"]), tmp_path / "m.lowbit", ConvertOptions(bits=8, group_size=32),
                 progress=False)
    gg = tmp_path / "m.gguf"
    export_gguf(lb, gg, strict=True)
    cfg = tiny_config("llama3")
    _, tensors = _fields(gg)
    factors = np.asarray(tensors["rope_freqs.weight"].data)
    np.testing.assert_allclose(factors, _llama3_factors(cfg.rope_parameters, cfg.head_dim), rtol=1e-6)
    back = convert(str(gg), tmp_path / "b.lowbit", ConvertOptions(), progress=False)
    ids = [1, *np.random.default_rng(3).integers(3, 4000, size=40).tolist()]
    want = Engine(lb, ctx=64, kv="32", exact_activations=True).logits_all(ids)
    assert rel_err(Engine(back, ctx=64, kv="32", exact_activations=True).logits_all(ids), want) < 1e-5


def test_llama_q_k_biases_are_permuted_like_their_rows(tmp_path):
    """llama.cpp's converter permutes a llama model's q/k biases with their rows; export does, and the import undoes
    it: a model with attention biases comes back with transformers' logits."""
    import torch
    from test_gguf_import import _build

    model = _build(tmp_path / "hf", "llama", attention_bias=True)
    lb = convert(str(tmp_path / "hf"), tmp_path / "m.lowbit", ConvertOptions(bits=16), progress=False)
    export_gguf(lb, tmp_path / "m.gguf", strict=True)
    back = convert(str(tmp_path / "m.gguf"), tmp_path / "b.lowbit", ConvertOptions(), progress=False)
    ids = [1, *np.random.default_rng(4).integers(3, 4000, size=30).tolist()]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    assert rel_err(Engine(back, ctx=64, kv="32").logits_all(ids), want) < 1e-4


def test_pre_tokenizer_names():
    """transformers' and lowbit's spellings of the same pre-tokenizers get llama.cpp's names; others are refused."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    smol = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
    split = {"type": "Split", "pattern": {"Regex": llama3}, "behavior": "Isolated", "invert": False}
    no_regex = {**byte_level, "use_regex": False}
    assert pre_name({"pre_tokenizer": smol}) == "smollm"
    assert pre_name({"pre_tokenizer": byte_level}) == "gpt-2"
    assert pre_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, no_regex]}}) == "llama-bpe"
    with pytest.raises(LowbitError, match="pre-tokenizer"):
        pre_name({"pre_tokenizer": {"type": "Whitespace"}})
    odd = {**split, "pattern": {"Regex": r"\w+"}}
    with pytest.raises(LowbitError, match="pre-tokenizer"):
        pre_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [odd, no_regex]}})


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, tiny_models):
    lb = convert(str(tiny_models["llama"]), tmp_path / "m.lowbit", ConvertOptions(bits=4), progress=False)
    out = tmp_path / "m.gguf"
    # the default 6-bit embeddings have a min: no exact GGUF type
    assert_clean_error(run_cli("export", lb, "-o", out, "--strict"), "no exact GGUF type")
    assert not out.exists()
    res = run_cli("export", lb, "-o", out)
    assert res.returncode == 0 and "re-quantized" in res.stdout and out.is_file()
    assert_clean_error(run_cli("export", lb, "-o", out), "file exists")
    assert_clean_error(run_cli("export", lb, "-o", tmp_path / "m.bin"), ".gguf")
    assert_clean_error(run_cli("export", lb, "-o", tmp_path / "m.onnx", "--format", "onnx"), "unknown --format")
    assert_clean_error(run_cli("export", out, "-o", tmp_path / "x.gguf"), "not a lowbit container")
    assert_clean_error(run_cli("export", tmp_path / "none.lowbit", "-o", tmp_path / "x.gguf"), "no such")
    assert_clean_error(run_cli("export", lb, "-o", tmp_path / "no" / "x.gguf"), "cannot write")
    assert_clean_error(run_cli("export", lb, "-o", tmp_path / "m.lowbit", "--force"), ".gguf")
    had = convert(str(tiny_models["llama"]), tmp_path / "h.lowbit", ConvertOptions(bits=4, method="hadamard+rtn"),
                  progress=False)
    assert_clean_error(run_cli("export", had, "-o", tmp_path / "h.gguf"), "Hadamard")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_failure_while_writing_removes_the_temporary_file(tmp_path, tiny_models, monkeypatch):
    import lowbit.convert.gguf_export as ex

    lb = convert(str(tiny_models["llama"]), tmp_path / "m.lowbit", ConvertOptions(bits=8), progress=False)
    calls = []

    def failing(*args):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    real = ex._tensor_data
    monkeypatch.setattr(ex, "_tensor_data", failing)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(lb, tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.lowbit"]


def test_gguf_compatible_conversion_chooses_only_exact_types(tiny_models, tmp_path):
    """--gguf-compatible: 3-bit asks become Q4-sized groups of 32, 6-bit embeddings symmetric 8-bit; a budget
    chooses among Q4_0/Q4_1/Q5_0/Q5_1/Q8_0's types; hadamard is refused."""
    src = str(tiny_models["qwen2"])
    lb = convert(src, tmp_path / "a.lowbit", ConvertOptions(bits=3, gguf_compatible=True), progress=False)
    types = {Container(lb).tensor(n).qtype.name for n in Container(lb).tensor_names}
    assert types == {"f32", "q4a_g32", "q8_g32"}
    assert not export_gguf(lb, tmp_path / "a.gguf", strict=True).inexact
    mixed = convert(src, tmp_path / "m.lowbit", ConvertOptions(target_bpw=6.0, gguf_compatible=True, **CAL),
                    progress=False)
    c = Container(mixed)
    assert {c.tensor(n).qtype.name for n in c.tensor_names} <= {"f32", "q4_g32", "q4a_g32", "q5_g32", "q5a_g32",
                                                                 "q8_g32"}  # fmt: skip
    assert not export_gguf(mixed, tmp_path / "m.gguf", strict=True).inexact
    with pytest.raises(LowbitError, match="gguf-compatible"):
        convert(src, tmp_path / "h.lowbit", ConvertOptions(method="hadamard+rtn", gguf_compatible=True),
                progress=False)
