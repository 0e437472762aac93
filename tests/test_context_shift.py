"""Context shift (--context-shift, off by default): a full cache drops the older half of the conversation after the
kept tokens (BOS, system prompt) and moves the rest back, keys re-rotated to their new positions."""

from __future__ import annotations

import numpy as np
import pytest
from lbtest import KEY, TOY_MODEL, LiveServer, assert_clean_error, run_cli

from lowbit.runtime.engine import Engine

TOL = {"32": 1e-4, "16": 2e-3, "8": 2e-2}


@pytest.mark.parametrize("kv", list(TOL))
def test_shifted_cache_holds_the_kept_tokens_at_their_new_positions(kv):
    """The first layer's keys and values depend only on the token and its position: after a shift they equal a fresh
    prefill of the kept tokens (up to the cache format's rounding)."""
    ids = [int(t) for t in np.random.default_rng(3).integers(3, 4000, size=60)]
    eng = Engine(TOY_MODEL, ctx=64, kv=kv, context_shift=True)
    eng.prefill(ids)
    dropped = eng.shift_context(keep=5)
    assert dropped == (60 - 5) // 2
    kept = ids[:5] + ids[5 + dropped :]
    assert eng.cached == kept
    fresh = Engine(TOY_MODEL, ctx=64, kv=kv)
    fresh.prefill(kept)
    n = len(kept)
    for got, want in ((eng.cache.keys(0, n), fresh.cache.keys(0, n)), (eng.cache.values(0, n),
                      fresh.cache.values(0, n))):
        assert np.abs(got - want).max() <= TOL[kv] * np.abs(want).max()


def test_generate_goes_past_the_context_only_with_the_flag():
    args = ["generate", TOY_MODEL, "--raw", "-p", "1, 2, 3, 4, 5,", "-n", "100", "--ctx", "48"]
    assert_clean_error(run_cli(*args), "context")
    res = run_cli(*args, "--context-shift")
    assert res.returncode == 0, res.stderr
    assert "context shifted" in res.stderr and "decode: 100 tokens" in res.stderr


def test_generation_with_a_shift_continues_the_same_stream():
    """A long greedy generation through several shifts, from the engine: 3x the context, every token produced."""
    eng = Engine(TOY_MODEL, ctx=40, context_shift=True)
    ids = eng.tokenizer.encode("1, 2, 3, 4, 5,", add_special_tokens=True)
    eng.eos_ids = set()
    out = [ev.token for ev in eng.generate(ids, max_tokens=120, keep=1) if ev.token >= 0]
    assert len(out) == 120 and eng.stats.shifted_tokens >= 80
    assert eng.cached[0] == ids[0]  # BOS kept


def test_server_context_shift():
    engine = Engine(TOY_MODEL, ctx=48, threads=1, context_shift=True)
    from lowbit.runtime.server import create_app

    with LiveServer(create_app(engine, api_key=KEY)) as srv:
        client = srv.client()
        r = client.chat.completions.create(model=TOY_MODEL.stem, max_tokens=80, temperature=0,
                                           messages=[{"role": "system", "content": "You count."},
                                                     {"role": "user", "content": "1, 2, 3, 4, 5,"}],
                                           extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 80 and r.choices[0].finish_reason == "length"
