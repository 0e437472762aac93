"""Property-based fuzzing of the container reader and the model loader (hypothesis): header edits with a valid
checksum, edits of the tensor table, byte flips and truncations of a small container. Every variant either loads a
model that runs (what validation promised: a forward pass gives logits of the vocabulary's size) or is refused with
the project's error; never another exception, never a hang (each example has a deadline).

LOWBIT_FUZZ_EXAMPLES sets the examples per test (default 700: ~2,100 variants in all)."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lbtest import TOY_MODEL

from lowbit.convert.converter import ConvertOptions
from lowbit.errors import LowbitError
from lowbit.formats.layout import MAGIC, PREAMBLE, data_start
from lowbit.formats.reader import Container
from lowbit.runtime.engine import Engine
from lowbit.runtime.measure.bench_model import build_random_container

EXAMPLES = int(os.environ.get("LOWBIT_FUZZ_EXAMPLES", "700"))
FUZZ = settings(max_examples=EXAMPLES, deadline=5000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SHAPE = dict(model_type="llama", vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
             rms_norm_eps=1e-5)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(-3, 70000)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


class Base(tuple):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example: not a megabyte of bytes
        return "<tiny container>"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(header dict, data section bytes, scratch file path) of a tiny random 4-bit llama with refsmall's tokenizer;
    one pristine load first (it compiles the kernels)."""
    root = tmp_path_factory.mktemp("fuzz")
    os.environ["LOWBIT_CACHE"] = str(root / "cache")  # verified stamps of the variants stay here
    with Container(TOY_MODEL) as c:
        tok = (c.meta["tokenizer"], c.blobs())
    src = build_random_container(SHAPE, ConvertOptions(bits=4, group_size=32), root / "tiny.lowbit", tokenizer=tok)
    raw = src.read_bytes()
    _, _, _, header_len, _, _ = PREAMBLE.unpack_from(raw, 0)
    header = json.loads(raw[PREAMBLE.size : PREAMBLE.size + header_len])
    data = raw[data_start(header_len) :]
    assert _load(src) == "loaded"
    yield Base((header, data, root / "variant.lowbit"))
    os.environ.pop("LOWBIT_CACHE", None)


def _assemble(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    pre = PREAMBLE.pack(MAGIC, 1, 0, len(text), zlib.crc32(text), 0)
    body = pre + text
    return body + b"\0" * (data_start(len(text)) - len(body)) + data


def _load(path: Path) -> str:
    try:
        eng = Engine(path, ctx=16, threads=1)
    except LowbitError:
        return "refused"
    logits = eng.model.forward(np.array([1, 2]), 0, eng.cache)
    assert logits.shape == (1, eng.args.vocab_size)
    eng.container.close()
    return "loaded"


def _leaves(obj, prefix=()):
    """Paths to every value of a JSON tree (the containers included)."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, (*prefix, i))


def _set(obj, path, value, delete=False):
    *head, last = path
    for k in head:
        obj = obj[k]
    if delete and isinstance(obj, dict):
        del obj[last]
    else:
        obj[last] = value


@FUZZ
@given(data=st.data())
def test_header_edits_load_or_refuse(base, data):
    header, body, path = base
    h = json.loads(json.dumps(header))
    # mostly the sections the runtime reads; sometimes anywhere (the tensor table included)
    paths = [p for p in _leaves(h) if p and p[0] != "hf_config"]
    runtime = [p for p in paths if p[0] in ("architecture", "tokenizer", "generation", "runtime", "quantization")]
    where = data.draw(st.sampled_from(runtime) if data.draw(st.booleans()) else st.sampled_from(paths))
    _set(h, where, data.draw(json_values), delete=data.draw(st.integers(0, 9)) == 0)
    path.write_bytes(_assemble(h, body))
    _load(path)


@FUZZ
@given(data=st.data())
def test_tensor_table_edits_load_or_refuse(base, data):
    header, body, path = base
    h = json.loads(json.dumps(header))
    name = data.draw(st.sampled_from(sorted(h["tensors"])))
    t = h["tensors"][name]
    kind = data.draw(st.sampled_from(["shape", "qtype", "part", "drop", "args"]))
    if kind == "shape":
        t["shape"] = data.draw(st.lists(st.integers(-5, 5000), max_size=3))
    elif kind == "qtype":
        t["qtype"] = data.draw(st.sampled_from(["q4_g32", "q8_g64", "q2_g64", "f16", "f32", "bf16", "zz"]))
    elif kind == "part":
        part = t["parts"][data.draw(st.sampled_from(sorted(t["parts"])))]
        part[data.draw(st.sampled_from(["offset", "nbytes", "shape", "dtype"]))] = data.draw(json_values)
    elif kind == "drop":
        del h["tensors"][name]
    else:  # dimensions that disagree with the tensors (or agree in a way that must still run)
        key = data.draw(st.sampled_from(sorted(SHAPE)[1:] + ["head_dim", "sliding_window", "rope_theta"]))
        h["architecture"]["args"][key] = data.draw(st.integers(-2, 9000) | st.floats(-1, 1e6))
    path.write_bytes(_assemble(h, body))
    _load(path)


def _checked(header: dict) -> list[tuple[int, int]]:
    """Byte ranges of the assembled file whose change must be refused: the preamble but its version numbers (a
    reader takes any major version up to its own and any minor one), the header, every tensor part and blob."""
    text = json.dumps(header).encode()
    start = data_start(len(text))
    spans = [(0, 8), (12, PREAMBLE.size + len(text))]
    for t in header["tensors"].values():
        spans += [(start + p["offset"], start + p["offset"] + p["nbytes"]) for p in t["parts"].values()]
    spans += [(start + b["offset"], start + b["offset"] + b["nbytes"]) for b in header["blobs"].values()]
    return spans


@FUZZ
@given(data=st.data())
def test_byte_flips_and_truncations_are_refused(base, data):
    header, body, path = base
    orig = _assemble(header, body)
    raw = bytearray(orig)
    spans = _checked(header)
    if data.draw(st.booleans()):
        flips = [data.draw(st.integers(0, len(raw) - 1)) for _ in range(data.draw(st.integers(1, 16)))]
        for at in flips:
            raw[at] ^= data.draw(st.integers(1, 255))
        path.write_bytes(bytes(raw))
        result = _load(path)
        # a flip in a checked byte is refused; flips only in alignment padding change nothing that is read
        if any(a <= at < b and raw[at] != orig[at] for at in flips for a, b in spans):
            assert result == "refused"
    else:
        cut = data.draw(st.integers(0, len(raw) - 1))
        path.write_bytes(bytes(raw[:cut]))
        result = _load(path)
        if cut < max(b for _, b in spans):  # only trailing padding may go
            assert result == "refused"


def _nasty(header: dict, body: bytes) -> dict[str, bytes]:
    """Variants that once found tracebacks or hangs (issue: hostile files)."""
    out = {}
    text = json.dumps(header).encode()
    deep = text[:-1] + b', "x": ' + b"[" * 50000 + b"]" * 50000 + b"}"
    big = text[:-1] + b', "x": ' + b"9" * 5000 + b"}"
    for name, blob in (("deep", deep), ("bigint", big)):
        pre = PREAMBLE.pack(MAGIC, 1, 0, len(blob), zlib.crc32(blob), 0) + blob
        out[name] = pre + b"\0" * (data_start(len(blob)) - len(pre)) + body
    for name, edit in (
        ("head_dim", lambda h: h["architecture"]["args"].update(head_dim=1000000)),
        ("layers", lambda h: h["architecture"]["args"].update(num_hidden_layers=7)),
        ("eps", lambda h: h["architecture"]["args"].update(rms_norm_eps=None)),
        ("shape", lambda h: h["tensors"]["blk.0.attn_q.weight"].update(shape=[-64, 64])),
        ("nbytes", lambda h: h["tensors"]["output_norm.weight"]["parts"]["data"].update(nbytes=256.0)),
        ("tokenizer", lambda h: h.update(tokenizer=[1, 2])),
        ("args", lambda h: h["architecture"].update(args=None)),
    ):
        h = json.loads(json.dumps(header))
        edit(h)
        out[name] = _assemble(h, body)
    return out


def test_cli_refuses_nasty_files_in_one_line(base, tmp_path):
    from lbtest import assert_clean_error, run_cli

    header, body, _ = base
    for name, blob in _nasty(header, body).items():
        path = tmp_path / f"{name}.lowbit"
        path.write_bytes(blob)
        assert_clean_error(run_cli("generate", path, "--raw", "-p", "Once", "-n", "2"), "corrupt")
        res = run_cli("inspect", path)  # shows what a readable header holds, else one line
        if res.returncode != 0 or name in ("deep", "bigint"):
            assert_clean_error(res, "corrupt")
