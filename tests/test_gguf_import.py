"""GGUF import (`lowbit convert MODEL.gguf`): tiny random GGUFs of every family against transformers, the block
decoders against gguf-py's dequantization, and bad input.

The GGUFs are written here from tiny transformers checkpoints with llama.cpp's conventions (tests/gguf_tiny.py):
the import must undo them (q/k permutation, gemma's 1 + w norms, phi3's fused ffn_up and longrope tensors, llama3's
rope_freqs) for the logits to match the checkpoint transformers runs. Configs are what llama.cpp can express: gemma's
attention scale is 1/sqrt(head_dim), gemma3 has its sliding layers in llama.cpp's fixed pattern of six.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf_tiny import write_gguf
from lbtest import REFSMALL, TINY, TOKENIZER_FILES, assert_clean_error, rel_err, run_cli, tiny_config

from lowbit.convert import gguf_quants
from lowbit.convert.converter import ConvertOptions, convert
from lowbit.errors import SourceError
from lowbit.formats.reader import Container
from lowbit.kernels.ref import dequantize
from lowbit.runtime.engine import Engine

SMALL = {k: v for k, v in TINY.items() if k != "num_hidden_layers"} | {"pad_token_id": 0}
SL, FU = "sliding_attention", "full_attention"
# what gguf-py quantizes in numpy: kept bit for bit ...
EXACT = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16")
# ... and re-quantized (types with no lowbit layout; they need rows of 256): relative RMS error bound of the import
REQUANTIZED = {"TQ1_0": 1e-3, "TQ2_0": 1e-3, "MXFP4": 0.04}  # measured: ~0, ~0, 0.031


def _config(kind: str):
    import transformers as tf

    if kind in ("llama", "llama3", "qwen2", "mistral"):
        return tiny_config(kind)
    return {
        "qwen3": lambda: tf.Qwen3Config(**SMALL, num_hidden_layers=2, head_dim=32, tie_word_embeddings=False),
        "gemma": lambda: tf.GemmaConfig(**SMALL, num_hidden_layers=2, head_dim=32),
        "gemma2": lambda: tf.Gemma2Config(**SMALL, num_hidden_layers=3, head_dim=32, sliding_window=8,
                                          query_pre_attn_scalar=32, attn_logit_softcapping=1.0,
                                          final_logit_softcapping=1.0),
        "gemma3": lambda: tf.Gemma3TextConfig(
            **SMALL, num_hidden_layers=6, head_dim=32, sliding_window=8, layer_types=[SL] * 5 + [FU],
            query_pre_attn_scalar=32, final_logit_softcapping=1.0,
            rope_parameters={FU: {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                             SL: {"rope_type": "default", "rope_theta": 10000.0}},
        ),
        "phi3": lambda: tf.Phi3Config(
            **SMALL, num_hidden_layers=2, original_max_position_embeddings=16, sliding_window=8,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                             "short_factor": [1.0 + 0.2 * i for i in range(4)],
                             "long_factor": [1.5 + 0.7 * i for i in range(4)]},
        ),
    }[kind]()  # fmt: skip


KINDS = ("llama", "llama3", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")


def _build(folder, kind: str, **overrides):
    """A tiny random transformers model (norms and biases nudged so they matter) and refsmall's tokenizer files."""
    import shutil

    import torch
    import transformers as tf

    torch.manual_seed(3)
    cfg = _config(kind)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.05)
            elif kind.startswith("gemma") and "embed_tokens" in name:
                p.mul_(0.5)
    model.save_pretrained(folder)
    for f in TOKENIZER_FILES:
        shutil.copy(REFSMALL / f, folder / f)
    return model


@pytest.fixture(scope="module")
def prompt():
    return [int(t) for t in np.random.default_rng(11).integers(3, 4096, size=40)]


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_gguf_of_every_family_matches_transformers(kind, tmp_path, prompt):
    import torch

    model = _build(tmp_path / "hf", kind)
    gg = write_gguf(tmp_path / "hf", tmp_path / "m.gguf")
    out = convert(str(gg), tmp_path / "m.lowbit", ConvertOptions(), progress=False)
    with torch.no_grad():
        want = model(torch.tensor([prompt])).logits[0].numpy()
    eng = Engine(out, ctx=128, kv="32")  # a float32 KV cache: exact numerics
    assert rel_err(eng.logits_all(prompt), want) < 1e-4
    eng.reset()  # token by token through the cache, past any window
    steps = [eng.prefill(prompt[:1])] + [eng.step(t) for t in prompt[1:]]
    assert rel_err(np.stack(steps), want) < 1e-4
    q = Container(out).meta["quantization"]
    assert q["method"] == "gguf-import" and set(q["import"].values()) == {"exact"}


def test_tokenizer_from_gguf_matches_the_checkpoint_tokenizer(tmp_path):
    """The SentencePiece vocabulary rebuilt from GGUF metadata tokenizes like refsmall's own tokenizer (llama.cpp puts
    the space prefix after special tokens too, like transformers' legacy Llama tokenizer)."""
    _build(tmp_path / "hf", "llama")
    gg = write_gguf(tmp_path / "hf", tmp_path / "m.gguf")
    tok = Engine(convert(str(gg), tmp_path / "m.lowbit", ConvertOptions(), progress=False), ctx=64).tokenizer
    ref = Engine(convert(str(tmp_path / "hf"), tmp_path / "r.lowbit", ConvertOptions(bits=8), progress=False),
                 ctx=64).tokenizer
    text = (REFSMALL.parent.parent / "data" / "dev-eval.txt").read_text()[:4000]
    assert tok.encode(text) == ref.encode(text)
    assert tok.encode(text)[0] == 1  # add_bos_token from the GGUF
    assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))
    # llama.cpp (legacy SentencePiece): a space prefix after a special token, where refsmall's config says
    # legacy: false; the rest of the chat tokenizes alike
    chat = [{"role": "user", "content": "Explain the asyncio module."}]
    ids, ref_ids = tok.encode_chat(chat), ref.encode_chat(chat)
    assert ids[0] == ref_ids[0] == 1
    assert ids[1:] == ref.encode(" " + tok.apply_chat_template(chat).removeprefix("<s>"), add_special_tokens=False)


@pytest.mark.parametrize("qtype", EXACT)
def test_quantized_gguf_imports_bit_exact(qtype, tmp_path, prompt):
    """Every type gguf-py quantizes that lowbit has: imported codes and scales (or floats) dequantize to gguf-py's
    numbers exactly."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize as gguf_dequantize

    _build(tmp_path / "hf", "qwen2")
    gg = write_gguf(tmp_path / "hf", tmp_path / "m.gguf", qtype=qtype)
    c = Container(convert(str(gg), tmp_path / "m.lowbit", ConvertOptions(), progress=False))
    for t in GGUFReader(gg).tensors:
        if t.tensor_type.name != qtype:
            continue
        want = gguf_dequantize(np.asarray(t.data), GGMLQuantizationType[qtype]).reshape(-1)
        st = c.tensor(t.name)
        assert st.qtype.name == gguf_quants.LOWBIT_TYPE[qtype]
        got = dequantize(st.parts, st.qtype, st.shape).reshape(-1)
        np.testing.assert_array_equal(got, want)
    assert "exact" in c.meta["quantization"]["import"].values()


@pytest.mark.parametrize("qtype", REQUANTIZED)
def test_types_without_a_lowbit_layout_are_requantized_closely(qtype, tmp_path):
    """Ternary TQ1_0/TQ2_0 and MXFP4 (gguf-py quantizes them too) are dequantized and re-quantized at no fewer bits
    (3 and 5, groups of 32): ternary levels are representable, FP4's uneven ones nearly."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize as gguf_dequantize

    _build(tmp_path / "hf", "qwen2", hidden_size=256, intermediate_size=512, head_dim=64)
    gg = write_gguf(tmp_path / "hf", tmp_path / "m.gguf", qtype=qtype)
    c = Container(convert(str(gg), tmp_path / "m.lowbit", ConvertOptions(), progress=False))
    seen = 0
    for t in GGUFReader(gg).tensors:
        if t.tensor_type.name != qtype:
            continue
        want = gguf_dequantize(np.asarray(t.data), GGMLQuantizationType[qtype]).reshape(-1)
        st = c.tensor(t.name)
        assert c.meta["quantization"]["import"][t.name] == f"re-quantized from {qtype}"
        assert st.qtype.bits == gguf_quants.REQUANT_BITS[qtype] and st.qtype.group_size == 32
        got = dequantize(st.parts, st.qtype, st.shape).reshape(-1)
        assert np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2)) < REQUANTIZED[qtype], t.name
        seen += 1
    assert seen > 0


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K"])
def test_k_quants_carry_their_scales_to_fp16(qtype):
    """Q4_K/Q5_K super-blocks (random bytes, finite scales) against gguf-py: sub-block scales d*sc and mins
    dmin*m rounded to fp16, nothing else changes."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    rng = np.random.default_rng(0)
    rows, cols, bb = 5, 768, {"Q4_K": 144, "Q5_K": 176}[qtype]
    raw = rng.integers(0, 256, (rows, cols // 256 * bb), dtype=np.uint8)
    blocks = raw.reshape(rows, -1, bb)
    for at in (0, 2):
        blocks[:, :, at : at + 2] = rng.uniform(0.001, 0.05, blocks.shape[:2]).astype(np.float16)[..., None].view(
            np.uint8
        )
    want = gguf_dequantize(raw, GGMLQuantizationType[qtype])
    qt, parts = gguf_quants.DECODERS[qtype][0](raw)
    got = dequantize(parts, qt, (rows, cols))
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 2e-3 * scale  # fp16 rounding of the products, times codes up to 31


def test_requantize_on_request(tmp_path, prompt):
    """With quantization options the GGUF is a float source: every matrix re-quantized, recorded per tensor."""
    _build(tmp_path / "hf", "llama")
    gg = write_gguf(tmp_path / "hf", tmp_path / "m.gguf", qtype="Q8_0")
    out = convert(str(gg), tmp_path / "m.lowbit", ConvertOptions(bits=4, group_size=32, requantize=True),
                  progress=False)
    c = Container(out)
    notes = c.meta["quantization"]["import"]
    assert notes["blk.0.attn_q.weight"] == "re-quantized from Q8_0"
    assert c.tensor("blk.0.attn_q.weight").qtype.name == "q4a_g32"
    assert np.isfinite(Engine(out, ctx=64).logits_all(prompt[:8])).all()
    # the GGUF itself as eval's reference: its dequantized weights, unquantized
    text = tmp_path / "t.txt"
    text.write_text((REFSMALL.parent.parent / "data" / "dev-eval.txt").read_text()[:3000])
    res = run_cli("eval", out, "--text", text, "--eval-ctx", 64, "--reference", gg, "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert 0 < got["kl_mean"] < 0.05 and got["top1"] > 0.5  # 4-bit weights of a random tiny model


def test_bad_gguf_input_is_one_line_and_no_output(tmp_path):
    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_bytes(b"this is not a gguf file at all" * 10)
    assert_clean_error(run_cli("convert", not_gguf, "-o", tmp_path / "a.lowbit"), "not a GGUF file")
    _build(tmp_path / "hf", "llama")
    gg = write_gguf(tmp_path / "hf", tmp_path / "m.gguf", qtype="Q4_0")
    data = gg.read_bytes()
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    assert_clean_error(run_cli("convert", truncated, "-o", tmp_path / "b.lowbit"), "t.gguf")
    # an architecture lowbit does not run: rewrite general.architecture's value in place (same length)
    other = tmp_path / "o.gguf"
    other.write_bytes(data.replace(b"llama", b"bloom", 1))
    assert_clean_error(run_cli("convert", other, "-o", tmp_path / "c.lowbit"), "unsupported GGUF architecture")
    assert not list(tmp_path.glob("*.lowbit")) and not list(tmp_path.glob(".*tmp*"))


def test_unreadable_tensor_type_is_a_clean_error(tmp_path):
    """A tensor whose type gguf-py cannot dequantize (here: I32) is refused with one line naming it."""
    import gguf

    _build(tmp_path / "hf", "llama")
    gg = write_gguf(tmp_path / "hf", tmp_path / "m.gguf")
    reader = gguf.GGUFReader(gg)
    w = gguf.GGUFWriter(str(tmp_path / "i.gguf"), "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        value = field.contents()
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, vtype)
    for t in reader.tensors:
        arr = np.asarray(t.data)
        if t.name == "blk.0.ffn_down.weight":
            arr = arr.astype(np.int32)
        w.add_tensor(t.name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    res = run_cli("convert", tmp_path / "i.gguf", "-o", tmp_path / "i.lowbit", "--bits", "4", "--no-progress")
    assert_clean_error(res, "blk.0.ffn_down.weight")
    assert not (tmp_path / "i.lowbit").exists()


def test_source_errors_name_the_problem(tmp_path):
    _build(tmp_path / "hf", "llama")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    gg = write_gguf(tmp_path / "hf", tmp_path / "m.gguf")
    with pytest.raises(SourceError, match="not a GGUF file"):
        from lowbit.convert.gguf_source import GGUFSource

        GGUFSource(tmp_path / "hf" / "config.json")
    assert gg.exists()


def test_sentencepiece_model_from_gguf_takes_a_grammar(tmp_path):
    """The grammar engine reads a SentencePiece tokenizer through its token table (runtime/constraint.py)."""
    from lowbit.runtime.constraint import json_schema_grammar

    _build(tmp_path / "hf", "llama")
    gg = write_gguf(tmp_path / "hf", tmp_path / "m.gguf")
    eng = Engine(convert(str(gg), tmp_path / "m.lowbit", ConvertOptions(), progress=False), ctx=128)
    assert eng.tokenizer.serialized() is None and len(eng.tokenizer.token_bytes()) == 4096
    schema = {"type": "object", "properties": {"k": {"type": "string", "enum": ["a b", "ü"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["k", "n"], "additionalProperties": False}  # fmt: skip
    for seed in range(3):
        from lowbit.runtime.sampling import SamplingParams

        c = eng.grammars.compile(json_schema_grammar(schema))
        text = "".join(ev.text for ev in eng.generate(eng.tokenizer.encode("x"), SamplingParams(1.0, seed=seed),
                                                       max_tokens=60, constraint=c))  # fmt: skip
        value = json.loads(text)
        assert value["k"] in ("a b", "ü") and 0 <= value["n"] <= 9
