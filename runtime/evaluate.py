"""Perplexity by the project's convention (DESIGN §9): tokens without special tokens, non-overlapping windows of
ctx-1 tokens each preceded by BOS, every position's prediction of the next token scored."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from lowbit.errors import LowbitError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood (nats)
    tokens: int  # scored tokens
    windows: int


def windows(ids: list[int], ctx: int, bos: int, max_tokens: int | None = None) -> Iterator[list[int]]:
    """[BOS] + ctx-1 tokens, non-overlapping, over the first ``max_tokens`` tokens (partial windows dropped)."""
    if ctx < 2:
        raise LowbitError("context must be at least 2 tokens")
    ids = ids[:max_tokens] if max_tokens else ids
    step = ctx - 1
    for i in range(0, len(ids) - step + 1, step):
        yield [bos, *ids[i : i + step]]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def perplexity(
    logits_fn: Callable[[list[int]], np.ndarray],
    ids: list[int],
    ctx: int,
    bos: int,
    max_tokens: int | None = None,
    on_window: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """``logits_fn(window) -> [len(window), vocab]`` logits from an empty context."""
    total = 0.0
    n = 0
    w = 0
    for win in windows(ids, ctx, bos, max_tokens):
        lp = log_softmax(logits_fn(win))
        targets = np.array(win[1:])
        total -= float(lp[np.arange(len(targets)), targets].sum())
        n += len(targets)
        w += 1
        if on_window:
            on_window(w)
    if n == 0:
        raise LowbitError(f"text is too short: need at least {ctx - 1} tokens for one window of context {ctx}")
    return PerplexityResult(float(np.exp(total / n)), total / n, n, w)
