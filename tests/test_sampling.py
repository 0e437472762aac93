"""Sampling and stop-string behaviour: real draws from small vocabularies, fixed seeds, exact penalty math."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lowbit.errors import LowbitError
from lowbit.runtime.sampling import Sampler, SamplingParams, StopMatcher


def softmax(x):
    e = np.exp(np.asarray(x, dtype=np.float64) - np.max(x))
    return e / e.sum()


def logits_for(probs):
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def draws(params: SamplingParams, logits, n: int, prompt=(), generated=()) -> np.ndarray:
    s = Sampler(params, len(logits))
    return np.array([s.sample(logits, prompt, generated) for _ in range(n)])


# ---------------------------------------------------------------- greedy / determinism


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    s = Sampler(SamplingParams(), 1000)
    for _ in range(20):
        logits = rng.normal(size=1000).astype(np.float32)
        assert s.sample(logits, [], []) == int(np.argmax(logits))


def test_same_seed_same_sequence_different_seed_differs():
    rng = np.random.default_rng(1)
    steps = [rng.normal(size=200).astype(np.float32) for _ in range(60)]

    def run(seed):
        s = Sampler(SamplingParams(temperature=1.0, seed=seed), 200)
        return [s.sample(x, [], []) for x in steps]

    assert run(123) == run(123)
    assert run(123) != run(124)


def test_sampler_does_not_touch_global_rng():
    np.random.seed(7)
    expected = np.random.random()
    np.random.seed(7)
    draws(SamplingParams(temperature=1.0, seed=3), np.zeros(8, np.float32), 50)
    assert np.random.random() == expected


def test_top_k_1_is_greedy_at_any_temperature():
    rng = np.random.default_rng(2)
    for temp in (0.5, 1.0, 5.0, 100.0):
        s = Sampler(SamplingParams(temperature=temp, top_k=1, seed=0), 50)
        for _ in range(20):
            logits = rng.normal(size=50).astype(np.float32)
            assert s.sample(logits, [], []) == int(np.argmax(logits))


def test_tiny_top_p_keeps_only_best():
    rng = np.random.default_rng(3)
    s = Sampler(SamplingParams(temperature=2.0, top_p=1e-6, seed=0), 64)
    for _ in range(50):
        logits = rng.normal(size=64).astype(np.float32)
        assert s.sample(logits, [], []) == int(np.argmax(logits))


def test_top_k_restricts_support():
    logits = logits_for([0.3, 0.25, 0.2, 0.15, 0.1])
    got = set(draws(SamplingParams(temperature=1.0, top_k=3, seed=0), logits, 2000).tolist())
    assert got == {0, 1, 2}


def test_top_p_support():
    logits = logits_for([0.4, 0.3, 0.2, 0.1])
    # mass before token 2 is 0.7 < 0.75 -> kept; before token 3 is 0.9 -> dropped
    got = set(draws(SamplingParams(temperature=1.0, top_p=0.75, seed=0), logits, 2000).tolist())
    assert got == {0, 1, 2}


def test_min_p_filters():
    logits = logits_for([0.5, 0.3, 0.15, 0.05])
    # threshold 0.2 * 0.5 = 0.1: token 3 (0.05) can never be drawn, the others can
    got = set(draws(SamplingParams(temperature=1.0, min_p=0.2, seed=0), logits, 3000).tolist())
    assert got == {0, 1, 2}
    # threshold 0.5 * 0.5 = 0.25: only tokens 0 and 1
    got = set(draws(SamplingParams(temperature=1.0, min_p=0.5, seed=0), logits, 3000).tolist())
    assert got == {0, 1}
    # min_p applies after temperature: at T=2 the probabilities flatten, so token 2 passes the 0.5 cut again
    flat = softmax(logits.astype(np.float64) / 2.0)
    expected = {i for i in range(4) if flat[i] >= 0.5 * flat.max()}
    assert 2 in expected
    got = set(draws(SamplingParams(temperature=2.0, min_p=0.5, seed=0), logits, 3000).tolist())
    assert got == expected


def test_filter_order_top_p_before_min_p():
    logits = logits_for([0.4, 0.3, 0.2, 0.1])
    # top_p=0.75 keeps {0,1,2} -> renormalised [.44,.33,.22]; min_p=0.3 then keeps all three (cut .133).
    # The reverse order (min_p first) would leave only {0,1}.
    got = set(draws(SamplingParams(temperature=1.0, top_p=0.75, min_p=0.3, seed=0), logits, 3000).tolist())
    assert got == {0, 1, 2}


def test_top_k_then_top_p_renormalises():
    logits = logits_for([0.4, 0.3, 0.2, 0.1])
    # top_k=3 -> [.444,.333,.222]; top_p=0.7: mass before token 1 is .444 < .7 -> kept, before token 2 .778 -> dropped
    got = set(draws(SamplingParams(temperature=1.0, top_k=3, top_p=0.7, seed=0), logits, 3000).tolist())
    assert got == {0, 1}


def reference_nucleus(probs, top_p):
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    return set(order[before < top_p].tolist())


@pytest.mark.parametrize("scale", [0.5, 3.0, 8.0])  # flat (full sort) to peaked (best-few-hundred shortcut)
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.99])
def test_top_p_large_vocab_matches_reference(scale, top_p):
    rng = np.random.default_rng(11)
    probs = softmax(rng.normal(size=5000) * scale)
    ids, kept = Sampler._nucleus(None, probs, top_p)
    assert set(ids.tolist()) == reference_nucleus(probs, top_p)
    assert math.isclose(kept.sum(), 1.0)
    np.testing.assert_allclose(kept, probs[ids] / probs[ids].sum())


def test_large_vocab_sampling_stays_in_support():
    rng = np.random.default_rng(12)
    logits = (rng.normal(size=5000) * 4).astype(np.float32)
    probs = softmax(logits.astype(np.float64))
    allowed = reference_nucleus(probs, 0.8)
    allowed = {i for i in allowed if probs[i] >= 0.1 * max(probs[j] for j in allowed)}
    got = set(draws(SamplingParams(temperature=1.0, top_p=0.8, min_p=0.1, seed=0), logits, 2000).tolist())
    assert got <= allowed and len(got) > 1
    got = set(draws(SamplingParams(temperature=1.0, min_p=0.5, seed=0), logits, 500).tolist())
    assert got <= {i for i in range(5000) if probs[i] >= 0.5 * probs.max()}


def test_empirical_distribution_matches_softmax():
    logits = np.array([1.0, 0.0, -0.5, 0.7], dtype=np.float32)
    n = 20000
    got = draws(SamplingParams(temperature=1.0, seed=42), logits, n)
    freq = np.bincount(got, minlength=4) / n
    np.testing.assert_allclose(freq, softmax(logits), atol=0.015)


def test_temperature_sharpens_and_flattens():
    logits = np.array([1.0, 0.0, -0.5, 0.7], dtype=np.float32)
    n = 20000
    for temp in (0.5, 2.0):
        got = draws(SamplingParams(temperature=temp, seed=5), logits, n)
        freq = np.bincount(got, minlength=4) / n
        np.testing.assert_allclose(freq, softmax(logits / temp), atol=0.015)


def test_neg_inf_logits_never_sampled():
    logits = np.array([0.0, -np.inf, 0.0, -np.inf], dtype=np.float32)
    got = set(draws(SamplingParams(temperature=1.0, seed=0), logits, 500).tolist())
    assert got == {0, 2}


# ---------------------------------------------------------------- penalties


def test_repetition_penalty_flips_greedy():
    logits = np.array([2.0, 1.9, -1.0, 0.5], dtype=np.float32)
    assert Sampler(SamplingParams(), 4).sample(logits, [0], []) == 0
    assert Sampler(SamplingParams(repetition_penalty=1.1), 4).sample(logits, [0], []) == 1
    # also counts generated tokens
    assert Sampler(SamplingParams(repetition_penalty=1.1), 4).sample(logits, [], [0]) == 1


def test_repetition_penalty_math():
    logits = np.array([2.0, -1.0, 0.5, 3.0], dtype=np.float32)
    s = Sampler(SamplingParams(repetition_penalty=2.0), 4)
    out = s.penalized(logits, [0, 1, 0], [1])  # repeats count once
    np.testing.assert_allclose(out, [1.0, -2.0, 0.5, 3.0])


def test_repetition_penalty_lowers_probability():
    n = 8000
    logits = np.array([1.0, 1.0, 1.0, 1.0], dtype=np.float32)
    got = draws(SamplingParams(temperature=1.0, repetition_penalty=1.5, seed=1), logits, n, prompt=[2])
    freq = np.bincount(got, minlength=4) / n
    x = np.array([1.0, 1.0, 1.0 / 1.5, 1.0])
    np.testing.assert_allclose(freq, softmax(x), atol=0.02)
    assert freq[2] < 0.2


def test_presence_and_frequency_penalty_math():
    logits = np.array([1.0, 1.0, 1.0, 1.0, 1.0], dtype=np.float32)
    s = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), 5)
    # prompt tokens do not count for presence/frequency
    out = s.penalized(logits, [4, 4, 4], [0, 1, 1, 1, 3])
    np.testing.assert_allclose(out, [1.0 - 0.5 - 0.25, 1.0 - 0.5 - 0.75, 1.0, 1.0 - 0.5 - 0.25, 1.0])


def test_negative_presence_penalty_boosts():
    logits = np.array([1.0, 1.2, 0.0], dtype=np.float32)
    assert Sampler(SamplingParams(presence_penalty=-0.5), 3).sample(logits, [], [0]) == 0


def test_all_penalties_combined_and_greedy():
    logits = np.array([3.0, 2.9, 2.8, -1.0], dtype=np.float32)
    p = SamplingParams(repetition_penalty=1.2, presence_penalty=0.1, frequency_penalty=0.1)
    s = Sampler(p, 4)
    out = s.penalized(logits, [1], [0, 0])
    np.testing.assert_allclose(out, [3.0 / 1.2 - 0.1 - 0.2, 2.9 / 1.2, 2.8, -1.0], rtol=1e-6)
    assert s.sample(logits, [1], [0, 0]) == 2


def test_input_logits_not_mutated():
    rng = np.random.default_rng(9)
    logits = rng.normal(size=32).astype(np.float32)
    before = logits.copy()
    kw = dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.5)
    p = SamplingParams(**kw, repetition_penalty=1.3, seed=0)
    s = Sampler(p, 32)
    for _ in range(10):
        s.sample(logits, [1, 2, 3], [4, 4, 5])
    s.logprobs(logits, 3, 5)
    s.penalized(logits, [1], [2])
    Sampler(SamplingParams(repetition_penalty=2.0), 32).sample(logits, [0, 1], [2])
    np.testing.assert_array_equal(logits, before)


# ---------------------------------------------------------------- logprobs


def test_logprobs():
    logits = np.array([2.0, 0.5, -1.0, 1.0, 0.0], dtype=np.float32)
    expected = np.log(softmax(logits))
    s = Sampler(SamplingParams(repetition_penalty=2.0, temperature=3.0), 5)  # ignored by logprobs
    lp, top = s.logprobs(logits, 2, 3)
    assert math.isclose(lp, expected[2], rel_tol=1e-9)
    assert [i for i, _ in top] == [0, 3, 1]
    for i, v in top:
        assert math.isclose(v, expected[i], rel_tol=1e-9)
    lp0, none = s.logprobs(logits, 0, 0)
    assert none == [] and math.isclose(lp0, expected[0])
    _, everything = s.logprobs(logits, 0, 50)
    assert [i for i, _ in everything] == [0, 3, 1, 4, 2]
    assert math.isclose(sum(math.exp(v) for _, v in everything), 1.0, rel_tol=1e-9)


def test_logprobs_large_logits_stable():
    logits = np.array([1000.0, 999.0, -1000.0], dtype=np.float32)
    lp, top = Sampler(SamplingParams(), 3).logprobs(logits, 1, 1)
    assert math.isclose(lp, -1.0 - math.log1p(math.exp(-1.0)), rel_tol=1e-6)
    assert top[0][0] == 0


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.01), "min_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(presence_penalty=-2.01), "presence_penalty"),
        (dict(frequency_penalty=3.0), "frequency_penalty"),
        (dict(frequency_penalty=float("-inf")), "frequency_penalty"),
        (dict(temperature="hot"), "temperature"),
        (dict(seed=-1), "seed"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_validate_errors(kwargs, needle):
    p = SamplingParams(**kwargs)
    with pytest.raises(LowbitError, match=needle):
        p.validate()
    with pytest.raises(LowbitError, match=needle):
        Sampler(p, 10)


def test_validate_accepts_edges():
    edges = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=1.0, presence_penalty=2.0, frequency_penalty=-2.0)
    SamplingParams(**edges, repetition_penalty=0.5, seed=0).validate()


def test_bad_inputs_raise_lowbit_error():
    s = Sampler(SamplingParams(temperature=1.0, seed=0), 4)
    with pytest.raises(LowbitError, match="shape"):
        s.sample(np.zeros(5, np.float32), [], [])
    with pytest.raises(LowbitError, match="NaN"):
        s.sample(np.array([0.0, np.nan, 0.0, 0.0], np.float32), [], [])
    with pytest.raises(LowbitError, match="outside the vocabulary"):
        Sampler(SamplingParams(frequency_penalty=1.0), 4).sample(np.zeros(4, np.float32), [], [7])
    with pytest.raises(LowbitError, match="outside the vocabulary"):
        s.logprobs(np.zeros(4, np.float32), 4, 1)
    with pytest.raises(LowbitError, match="vocab_size"):
        Sampler(SamplingParams(), 0)


# ---------------------------------------------------------------- stop strings


def stream(matcher: StopMatcher, chunks) -> tuple[str, bool]:
    out = []
    for c in chunks:
        text, stopped = matcher.feed(c)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def test_stop_inside_one_chunk():
    m = StopMatcher(["</s>"])
    assert m.feed("hello</s>world") == ("hello", True)
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_stop_spanning_chunks_char_by_char():
    m = StopMatcher(["STOP"])
    emitted = []
    for ch in "abc STOP def":
        text, stopped = m.feed(ch)
        emitted.append(text)
        if stopped:
            break
    assert stopped
    assert "".join(emitted) == "abc "
    # nothing from the stop string was ever emitted, even partially
    assert all("S" not in t for t in emitted)


def test_partial_match_released():
    m = StopMatcher(["STOP"])
    assert m.feed("ab ST") == ("ab ", False)
    assert m.feed("O") == ("", False)
    assert m.feed("x") == ("STOx", False)
    assert m.feed(" S") == (" ", False)
    assert m.flush() == "S"


def test_overlapping_partial_restarts():
    # "aab": the first 'a' is a false start but the second one begins the real stop string
    m = StopMatcher(["ab"])
    assert m.feed("a") == ("", False)
    assert m.feed("a") == ("a", False)
    assert m.feed("b") == ("", True)


def test_multiple_stop_strings():
    stops = ["\n\n", "User:"]
    assert stream(StopMatcher(stops), ["Hi there", "\n", "User", ":", " x"]) == ("Hi there\n", True)
    assert stream(StopMatcher(stops), ["Hi", "\n", "\n", "User:"]) == ("Hi", True)
    assert stream(StopMatcher(["xyz", "abc"]), ["123abcxyz"]) == ("123", True)


def test_chunking_does_not_change_result():
    stops = ["abc", "b", "END"]
    text = "zzab abc ENxEND tail"
    whole = stream(StopMatcher(stops), [text])
    chars = stream(StopMatcher(stops), list(text))
    pairs = stream(StopMatcher(stops), [text[i : i + 2] for i in range(0, len(text), 2)])
    assert whole == chars == pairs == ("zza", True)


def test_flush_returns_held_text():
    m = StopMatcher(["<|end|>"])
    assert m.feed("answer <|e") == ("answer ", False)
    assert m.flush() == "<|e"
    assert m.flush() == ""


def test_no_stops_passes_through():
    m = StopMatcher([])
    assert m.feed("anything") == ("anything", False)
    assert m.flush() == ""


def test_empty_stop_rejected():
    with pytest.raises(LowbitError, match="empty"):
        StopMatcher(["ok", ""])
