"""`lowbit eval --reference`: KL divergence, top-1 agreement and reference perplexity over the same windows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from lbtest import DEV_EVAL, REFSMALL, TOKENIZER_FILES, TOY_MODEL, assert_clean_error, run_cli

from lowbit.convert.converter import ConvertOptions, convert
from lowbit.runtime.cli import main
from lowbit.runtime.engine import Engine
from lowbit.runtime.measure import evaluate as ev

CTX = 32  # tiny models allow 256 positions




@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("text") / "t.txt"
    f.write_text(DEV_EVAL.read_text(encoding="utf-8")[:1500], encoding="utf-8")
    return f


@pytest.fixture(scope="module")
def tiny(tiny_models, tmp_path_factory) -> dict:
    """The tiny llama's HF folder and its 8-bit and explicitly converted 16-bit containers."""
    root = tmp_path_factory.mktemp("tiny-eval")
    src = str(tiny_models["llama"])
    return {
        "hf": tiny_models["llama"],
        8: convert(src, root / "t8.lowbit", ConvertOptions(bits=8), progress=False),
        16: convert(src, root / "t16.lowbit", ConvertOptions(bits=16), progress=False),
    }


def _ids(engine: Engine, text_file: Path) -> list[int]:
    return engine.tokenizer.encode(text_file.read_text(encoding="utf-8"), add_special_tokens=False)


def test_model_against_itself_has_zero_kl_and_full_agreement(text_file):
    a, b = Engine(TOY_MODEL, ctx=64), Engine(TOY_MODEL, ctx=64)
    ids = _ids(a, text_file)
    res = ev.evaluate(a.logits_all, ids, 64, a.tokenizer.bos_id, ref_logits_fn=b.logits_all)
    assert res.windows == len(ids) // 63 >= 4 and res.tokens == 63 * res.windows
    assert abs(res.kl_mean) < 1e-12 and abs(res.kl_p99) < 1e-12 and abs(res.kl_max) < 1e-12
    assert res.top1 == 1.0
    assert res.ref_ppl == res.ppl and res.delta_ppl_pct == 0.0
    assert res.ppl == ev.perplexity(a.logits_all, ids, 64, a.tokenizer.bos_id).ppl


def _direct(cand: Engine, ref: Engine, ids: list[int], ctx: int, max_tokens: int | None = None) -> dict:
    """The same numbers straight from numpy: every window's logits of both, log-softmax, KL, argmax."""
    bos = cand.tokenizer.bos_id
    n = (min(len(ids), max_tokens or len(ids)) // (ctx - 1)) * (ctx - 1)
    kls, agree, nll_c, nll_r = [], 0, 0.0, 0.0
    for start in range(0, n, ctx - 1):
        win = [bos, *ids[start : start + ctx - 1]]
        tgt = np.array(win[1:])
        rows = np.arange(len(tgt))
        lp, lq = (x[: len(tgt)].astype(np.float64) for x in (cand.logits_all(win), ref.logits_all(win)))
        lp = lp - np.logaddexp.reduce(lp, axis=-1, keepdims=True)
        lq = lq - np.logaddexp.reduce(lq, axis=-1, keepdims=True)
        kls.append(np.sum(np.exp(lq) * (lq - lp), axis=-1))
        agree += int(np.sum(lp.argmax(-1) == lq.argmax(-1)))
        nll_c -= lp[rows, tgt].sum()
        nll_r -= lq[rows, tgt].sum()
    kl = np.concatenate(kls)
    return dict(tokens=n, ppl=np.exp(nll_c / n), ref_ppl=np.exp(nll_r / n), kl_mean=kl.mean(),
                kl_p99=np.percentile(kl, 99), top1=agree / n)


@pytest.mark.parametrize("chunk", [ev.CHUNK_ELEMENTS, 4096 * 5])  # whole windows, and 5 rows per float64 chunk
def test_matches_direct_numpy_computation(tiny, text_file, monkeypatch, chunk):
    monkeypatch.setattr(ev, "CHUNK_ELEMENTS", chunk)
    cand, ref = Engine(tiny[8], ctx=CTX), Engine(tiny[16], ctx=CTX, kv="32")
    ids = _ids(cand, text_file)
    got = ev.evaluate(cand.logits_all, ids, CTX, cand.tokenizer.bos_id, max_tokens=300, ref_logits_fn=ref.logits_all)
    want = _direct(cand, ref, ids, CTX, max_tokens=300)
    assert got.tokens == want["tokens"] == 9 * 31 and got.windows == 9
    for key in ("ppl", "ref_ppl", "kl_mean", "kl_p99"):
        assert getattr(got, key) == pytest.approx(want[key], rel=1e-9, abs=1e-15), key
    assert got.top1 == want["top1"]
    assert got.kl_mean > 0 and got.kl_p99 >= got.kl_mean
    assert got.delta_ppl_pct == pytest.approx((want["ppl"] / want["ref_ppl"] - 1) * 100, rel=1e-9)


def test_evaluate_many_runs_reference_once_per_window(tiny, text_file):
    cand, ref = Engine(tiny[8], ctx=CTX), Engine(tiny[16], ctx=CTX, kv="32")
    calls = []

    def ref_fn(win):
        calls.append(win)
        return ref.logits_all(win)

    ids = _ids(cand, text_file)
    bos = cand.tokenizer.bos_id
    r16_fn = Engine(tiny[16], ctx=CTX, kv="32").logits_all
    r8, r16 = ev.evaluate_many([cand.logits_all, r16_fn], ids, CTX, bos, 200, ref_fn)
    assert len(calls) == r8.windows == 6
    assert r16.kl_mean == 0.0 and r16.top1 == 1.0 and r8.kl_mean > 0
    single = ev.evaluate(cand.logits_all, ids, CTX, bos, 200, ref.logits_all)
    assert single == r8
    with pytest.raises(ev.LowbitError, match="too short: 20 tokens"):
        ev.evaluate(cand.logits_all, ids, CTX, bos, 20, ref.logits_all)


def test_hf_folder_reference_equals_explicit_16bit_container(tiny, text_file):
    cand = Engine(tiny[8], ctx=CTX)
    ids = _ids(cand, text_file)
    bos = cand.tokenizer.bos_id
    with ev.reference_engine(str(tiny["hf"]), CTX) as ref:
        tmp = ref.path.parent
        assert ref.container.meta["quantization"]["bits"] == 16
        ev.check_same_tokens(cand, ref, text_file.read_text(encoding="utf-8"), ids)
        from_hf = ev.evaluate(cand.logits_all, ids, CTX, bos, 200, ref.logits_all)
    assert not tmp.exists()  # the temporary container is gone with the context
    explicit = ev.evaluate(cand.logits_all, ids, CTX, bos, 200, Engine(tiny[16], ctx=CTX, kv="32").logits_all)
    assert from_hf.kl_mean > 0 and from_hf.top1 <= 1.0
    assert from_hf == explicit


def test_cli_json_with_hf_reference(tiny, text_file):
    res = run_cli("eval", tiny[8], "--text", text_file, "--eval-ctx", CTX, "--max-tokens", 200,
                  "--reference", tiny["hf"], "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert "eval:" not in res.stderr  # no progress bar with --json
    for key in ("ppl", "tokens", "windows", "bpw", "file_bytes", "reference", "ref_ppl", "delta_ppl_pct",
                "kl_mean", "kl_p99", "top1"):
        assert key in got, key
    assert got["tokens"] == got["windows"] * (CTX - 1) == 6 * 31
    assert got["file_bytes"] == tiny[8].stat().st_size and 8 < got["bpw"] < 9
    assert got["delta_ppl_pct"] == pytest.approx((got["ppl"] / got["ref_ppl"] - 1) * 100)
    assert 0 < got["kl_mean"] <= got["kl_p99"] and 0 <= got["top1"] <= 1
    cand = Engine(tiny[8], ctx=CTX)
    want = ev.evaluate(cand.logits_all, _ids(cand, text_file), CTX, cand.tokenizer.bos_id, 200,
                       Engine(tiny[16], ctx=CTX, kv="32").logits_all)
    for key in ("ppl", "ref_ppl", "kl_mean", "kl_p99", "top1"):
        assert got[key] == pytest.approx(getattr(want, key), rel=1e-12), key
    plain = run_cli("eval", tiny[8], "--text", text_file, "--eval-ctx", CTX, "--max-tokens", 200, "--json")
    only = json.loads(plain.stdout.strip().splitlines()[-1])
    assert only["ppl"] == got["ppl"] and "kl_mean" not in only and "reference" not in only


def test_cli_text_output_with_container_reference(tiny, text_file, capsys):
    code = main(["eval", str(tiny[8]), "--text", str(text_file), "--eval-ctx", str(CTX), "--max-tokens", "200",
                 "--reference", str(tiny[16])])
    assert code == 0
    out = capsys.readouterr()
    cand = Engine(tiny[8], ctx=CTX)
    want = ev.evaluate(cand.logits_all, _ids(cand, text_file), CTX, cand.tokenizer.bos_id, 200,
                       Engine(tiny[16], ctx=CTX, kv="32").logits_all)
    first, second = out.out.strip().splitlines()
    assert first.startswith(f"perplexity {want.ppl:.4f} over 186 tokens (6 windows of {CTX});")
    assert "bits/weight" in first and "MB" in first
    assert f"reference perplexity {want.ref_ppl:.4f} (model {want.delta_ppl_pct:+.2f}%)" in second
    assert f"mean {want.kl_mean:.5f} p99 {want.kl_p99:.5f} nats" in second
    assert f"top-1 agreement {want.top1 * 100:.2f}%" in second
    assert "6/6" in out.err  # the progress bar over windows


def test_cli_missing_reference(tmp_path, text_file):
    res = run_cli("eval", "--text", text_file, "--eval-ctx", 64, "--reference", tmp_path / "nope.lowbit")
    assert_clean_error(res, "no such file")
    res = run_cli("eval", "--text", text_file, "--eval-ctx", 64, "--reference", tmp_path / "nope")
    assert_clean_error(res, f"reference {tmp_path / 'nope'}: no such file")


def test_cli_reference_with_other_vocab(tmp_path, tiny, text_file):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(tiny["hf"], vocab_size=4160))
    model.save_pretrained(tmp_path / "wide")
    for f in TOKENIZER_FILES:
        shutil.copy(REFSMALL / f, tmp_path / "wide" / f)
    res = run_cli("eval", tiny[8], "--text", text_file, "--eval-ctx", CTX, "--reference", tmp_path / "wide")
    assert_clean_error(res, "vocabulary of 4160 tokens, the model 4096")


def test_cli_reference_tokenizing_differently(tmp_path, tiny, text_file):
    ref = tmp_path / "ref"
    shutil.copytree(tiny["hf"], ref)
    tok = json.loads((ref / "tokenizer.json").read_text(encoding="utf-8"))
    tok["model"]["merges"] = tok["model"]["merges"][:50]  # same vocabulary, fewer merges: longer token sequences
    (ref / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    res = run_cli("eval", tiny[8], "--text", text_file, "--eval-ctx", CTX, "--reference", ref)
    assert_clean_error(res, "reference tokenizes the text differently")


def test_cli_text_too_short_with_reference(tmp_path, tiny):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.", encoding="utf-8")
    res = run_cli("eval", tiny[8], "--text", short, "--eval-ctx", CTX, "--reference", tiny["hf"])
    assert_clean_error(res, "text is too short")


def _bigram_logits(table: np.ndarray):
    """A model whose next-token logits depend only on the current token: every position's score is the same in any
    window, so strided evaluation can be checked against a direct per-token sum."""
    return lambda win: table[np.asarray(win)]


@pytest.mark.parametrize("ctx, stride", [(9, 8), (9, 3), (9, 1), (16, 5)])
def test_stride_scores_every_token_once(ctx, stride):
    rng = np.random.default_rng(ctx * 100 + stride)
    table = rng.standard_normal((50, 50)).astype(np.float32)
    ids = rng.integers(2, 50, size=103).tolist()
    res = ev.evaluate(_bigram_logits(table), ids, ctx, 1, stride=stride)
    n_win = ev.count_windows(len(ids), ctx, None, stride)
    covered = (ctx - 1) + (n_win - 1) * stride  # tokens 0 .. covered-1 are scored, each once
    assert res.tokens == covered and res.windows == n_win
    prev = np.asarray([1, *ids[: covered - 1]])  # the token before each scored one, BOS for the first
    if stride == ctx - 1:  # non-overlapping: every window's first token is predicted from its BOS
        prev[:: ctx - 1] = 1
    lp = ev.log_softmax(table[prev])
    want = -lp[np.arange(covered), np.asarray(ids[:covered])].mean()
    assert res.nll == pytest.approx(want, rel=1e-12)


def test_default_stride_is_non_overlapping(tiny, text_file):
    eng = Engine(tiny[16], ctx=32)
    ids = _ids(eng, text_file)
    a = ev.evaluate(eng.logits_all, ids, 32, eng.tokenizer.bos_id, 400)
    b = ev.evaluate(eng.logits_all, ids, 32, eng.tokenizer.bos_id, 400, stride=31)
    assert (a.nll, a.tokens, a.windows) == (b.nll, b.tokens, b.windows)
    with pytest.raises(ev.LowbitError, match="--stride 32"):
        ev.evaluate(eng.logits_all, ids, 32, eng.tokenizer.bos_id, 400, stride=32)


def test_cli_stride(tiny, text_file):
    res = run_cli("eval", tiny[16], "--text", text_file, "--eval-ctx", "32", "--max-tokens", "200", "--stride", "8",
                  "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["stride"] == 8 and out["tokens"] == 31 + (out["windows"] - 1) * 8
    assert_clean_error(run_cli("eval", tiny[16], "--text", text_file, "--stride", "0"), "--stride 0")
