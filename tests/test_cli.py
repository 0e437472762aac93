"""The commands on their success paths, through the real command line and the bundled model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from lbtest import DEV_EVAL, TOY_MODEL

from lowbit.runtime.engine import Engine, default_model_path
from lowbit.runtime.measure.evaluate import log_softmax, perplexity, windows


def lowbit(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "lowbit.runtime.cli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_bundled_model_generates_with_chat_template():
    assert default_model_path().exists()
    res = lowbit("generate", "-p", "Explain the asyncio module.", "-n", "24")
    assert res.returncode == 0, res.stderr
    eng = Engine(ctx=256)
    ids = eng.tokenizer.encode_chat([{"role": "user", "content": "Explain the asyncio module."}])
    want = "".join(ev.text for ev in eng.generate(ids, max_tokens=24))
    assert res.stdout.rstrip("\n") == want and len(want) > 20
    assert "prefill:" in res.stderr and "decode:" in res.stderr and "tok/s" in res.stderr


def test_bundled_model_answers_like_an_assistant():
    """The bundled default is SmolLM2-135M-Instruct (imported from its GGUF): a sensible answer, ChatML, and the
    reply ends at <|im_end|> rather than at max_tokens."""
    res = lowbit("run", "-p", "What is the capital of France?", "-n", "48")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout
    res = lowbit("generate", "-p", "What is the capital of France?", "-n", "48")
    assert res.returncode == 0 and "Paris" in res.stdout and "finish: stop" in res.stderr


def test_generate_raw_and_seeded_sampling_reproducible():
    a = lowbit("generate", "-p", "The os module", "--raw", "-n", "16", "--temp", "0.9", "--seed", "5")
    b = lowbit("generate", "-p", "The os module", "--raw", "-n", "16", "--temp", "0.9", "--seed", "5")
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.strip()


def test_cpu_engine_reads_the_model_into_memory_unless_mmap():
    mem, mapped = Engine(ctx=64), Engine(ctx=64, mmap=True)
    assert mem.container.resident and not mapped.container.resident
    ids = mem.tokenizer.encode("The os module", add_special_tokens=True)
    np.testing.assert_array_equal(mem.logits_all(ids), mapped.logits_all(ids))
    a = lowbit("generate", "-p", "The os module", "--raw", "-n", "12")
    b = lowbit("generate", "-p", "The os module", "--raw", "-n", "12", "--mmap")
    assert a.returncode == 0 and b.returncode == 0, b.stderr
    assert a.stdout == b.stdout and a.stdout.strip()


def test_generate_stop_string():
    eng = Engine(ctx=256)
    ids = eng.tokenizer.encode("The os module", add_special_tokens=True)
    full = "".join(ev.text for ev in eng.generate(ids, max_tokens=24, continuation=True))
    stop = full[10:13]
    res = lowbit("generate", "-p", "The os module", "--raw", "-n", "24", "--stop", stop)
    assert res.returncode == 0
    assert res.stdout.rstrip("\n") == full[: full.index(stop)]


def test_continuation_text_is_decoded_in_context():
    """A plain continuation keeps its first token's leading space (prompt text + output = decode of everything); a
    chat reply is decoded on its own."""
    eng = Engine(TOY_MODEL, ctx=256)  # a SentencePiece tokenizer: the reply alone drops the leading space
    tok = eng.tokenizer
    ids = tok.encode("The os module provides", add_special_tokens=True)
    events = list(eng.generate(ids, max_tokens=12, continuation=True))
    gen = [ev.token for ev in events if ev.token >= 0]
    text = "".join(ev.text for ev in events)
    assert tok.decode(ids + gen) == tok.decode(ids) + text
    assert text.startswith(" ")  # the model continues with a new word (" a ...")
    alone = "".join(ev.text for ev in eng.generate(ids, max_tokens=12))
    assert alone == tok.decode(gen) == text.lstrip(" ")


def test_inspect_bundled_model_and_verify():
    res = lowbit("inspect", "--verify")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "architecture:  llama" in out and "q4a_g32" in out and "all CRC32 checksums match" in out
    assert "method=gguf-import" in out and "gguf import:   272 exact" in out and '"kernel_activations": "exact"' in out
    bpw = float(out.split("bits/weight:")[1].split("overall")[0])
    matrices = float(out.split("overall (all tensor data / parameters),")[1].split("in the")[0])
    assert matrices == 5.0 and 5.7 < bpw < 5.8  # SmolLM2's Q4_1 GGUF as it is: 4-bit g32 with mins, 8-bit embedding
    tensors = lowbit("inspect", "--tensors").stdout
    assert "blk.0.attn_q.weight" in tensors and tensors.count("  exact\n") == 272


def test_eval_matches_direct_numpy_computation(tmp_path):
    text = DEV_EVAL.read_text(encoding="utf-8")[:6000]
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    res = lowbit("eval", "--text", f, "--eval-ctx", "64", "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    eng = Engine(ctx=64)
    ids = eng.tokenizer.encode(text, add_special_tokens=False)
    nll, n = 0.0, 0
    for win in windows(ids, 64, eng.tokenizer.bos_id):
        # one position at a time through the KV cache: an independent path to the same numbers
        eng.reset()
        rows = [eng.prefill(win[:1])] + [eng.step(t) for t in win[1:-1]]
        lp = log_softmax(np.stack(rows))
        nll -= lp[np.arange(len(win) - 1), win[1:]].sum()
        n += len(win) - 1
    assert got["tokens"] == n == (len(ids) // 63) * 63
    # 1e-3, not float rounding: the two paths round activations to int8 independently, and a last-bit difference
    # upstream can move one element to the neighbouring level (a 1/127 step of its group's largest value)
    assert abs(got["ppl"] - np.exp(nll / n)) / got["ppl"] < 1e-3
    assert perplexity(eng.logits_all, ids, 64, eng.tokenizer.bos_id).tokens == n


def test_prefill_in_chunks_gives_the_same_logits():
    # a float32 cache: chunks of 4 run the decode kernels, whose last-bit differences a float16 cache would round
    # to a whole float16 step now and then
    eng = Engine(ctx=256, kv="32")
    ids = eng.tokenizer.encode("The os module provides a portable way of using operating system functionality.")
    whole = eng.prefill(ids)
    eng.reset()
    eng.prefill_chunk = 4
    eng.stats = type(eng.stats)()
    chunked = eng.prefill(ids)
    assert eng.cached == ids and eng.stats.prefilled_tokens == len(ids) and len(ids) > 3 * 4
    np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-4 * np.abs(whole).max())
