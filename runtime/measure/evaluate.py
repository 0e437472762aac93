"""Quality by the project's convention (DESIGN §9): tokens without special tokens, non-overlapping windows of
ctx-1 tokens each preceded by BOS, every position's prediction of the next token scored.

Perplexity of a model, and against a reference model run over the same windows: the reference's perplexity, the
mean and 99th percentile of KL(reference ‖ candidate) over all scored positions, and top-1 agreement (fraction of
positions whose argmax agrees). Everything is computed in float64 from log-softmax, one window at a time (in row
chunks for large vocabularies); the only thing kept per position is its KL value, for the exact percentile.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lowbit.errors import LowbitError
from lowbit.kernels.ref import log_softmax

if TYPE_CHECKING:
    from lowbit.runtime.engine import Engine

log = logging.getLogger(__name__)

LogitsFn = Callable[[list[int]], np.ndarray]
CHUNK_ELEMENTS = 1 << 22  # float64 rows processed at once: 32 MB per temporary array


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood (nats)
    tokens: int  # scored tokens
    windows: int


@dataclass
class EvalResult:
    ppl: float
    nll: float  # mean negative log-likelihood (nats)
    tokens: int  # scored positions
    windows: int
    # against a reference (None without one)
    ref_ppl: float | None = None
    ref_nll: float | None = None
    kl_mean: float | None = None  # nats, mean over scored positions of KL(reference ‖ candidate)
    kl_p99: float | None = None  # 99th percentile of the per-position KL (numpy's linear interpolation)
    kl_max: float | None = None
    top1: float | None = None  # fraction of positions where the two argmaxes agree

    @property
    def delta_ppl_pct(self) -> float | None:
        return None if self.ref_ppl is None else (self.ppl / self.ref_ppl - 1.0) * 100.0

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.ref_ppl is not None:
            d["delta_ppl_pct"] = self.delta_ppl_pct
        return {k: v for k, v in d.items() if v is not None}


def _stride(ctx: int, stride: int | None) -> int:
    if ctx < 2:
        raise LowbitError("context must be at least 2 tokens")
    if stride is None:
        return ctx - 1
    if not 1 <= stride <= ctx - 1:
        raise LowbitError(f"--stride {stride}: expected 1 to ctx-1 = {ctx - 1} tokens")
    return stride


def count_windows(n_ids: int, ctx: int, max_tokens: int | None = None, stride: int | None = None) -> int:
    step = _stride(ctx, stride)
    n = min(n_ids, max_tokens) if max_tokens else n_ids
    return 0 if n < ctx - 1 else (n - (ctx - 1)) // step + 1


def scored_windows(ids: list[int], ctx: int, bos: int, max_tokens: int | None = None,
                   stride: int | None = None) -> Iterator[tuple[list[int], int]]:
    """(window, skip): [BOS] + ctx-1 tokens starting every ``stride`` tokens (default ctx-1: non-overlapping) over
    the first ``max_tokens`` tokens, partial windows dropped; the first ``skip`` predictions of a window were scored
    by an earlier one (with more context there), so every token is scored once, by the window that sees the most of
    what precedes it."""
    step = _stride(ctx, stride)
    for w in range(count_windows(len(ids), ctx, max_tokens, stride)):
        yield [bos, *ids[w * step : w * step + ctx - 1]], (0 if w == 0 else ctx - 1 - step)


def windows(ids: list[int], ctx: int, bos: int, max_tokens: int | None = None) -> Iterator[list[int]]:
    """[BOS] + ctx-1 tokens, non-overlapping, over the first ``max_tokens`` tokens (partial windows dropped)."""
    for win, _ in scored_windows(ids, ctx, bos, max_tokens):
        yield win


class Accumulator:
    """Running sums for one candidate (and optionally its reference) over windows fed one at a time."""

    def __init__(self, reference: bool = False):
        self.reference = reference
        self.nll = 0.0
        self.ref_nll = 0.0
        self.agree = 0
        self.tokens = 0
        self.windows = 0
        self.kl: list[np.ndarray] = []

    def add(self, window: Sequence[int], logits: np.ndarray, ref_logits: np.ndarray | None = None,
            skip: int = 0) -> None:
        """Score one window: ``logits[i]`` (and ``ref_logits[i]``) predict ``window[i + 1]``; the first ``skip``
        predictions are left out (scored by an earlier, overlapping window)."""
        targets = np.asarray(window[1 + skip :], dtype=np.int64)
        n = len(targets)
        _check_logits(logits, n + skip, "model")
        logits = logits[skip:]
        if ref_logits is not None:
            _check_logits(ref_logits, n + skip, "reference")
            ref_logits = ref_logits[skip:]
        if self.reference:
            if ref_logits is None:
                raise ValueError("this accumulator compares against a reference: pass ref_logits")
            if ref_logits.shape[1] != logits.shape[1]:
                raise LowbitError(f"reference scores {ref_logits.shape[1]} tokens, the model {logits.shape[1]}")
        step = max(1, CHUNK_ELEMENTS // logits.shape[1])
        for a in range(0, n, step):
            b = min(n, a + step)
            rows = np.arange(b - a)
            lp = log_softmax(logits[a:b])
            self.nll -= float(lp[rows, targets[a:b]].sum())
            if self.reference:
                lq = log_softmax(ref_logits[a:b])
                self.ref_nll -= float(lq[rows, targets[a:b]].sum())
                self.kl.append((np.exp(lq) * (lq - lp)).sum(axis=-1))
                self.agree += int((lq.argmax(axis=-1) == lp.argmax(axis=-1)).sum())
        self.tokens += n
        self.windows += 1

    def result(self) -> EvalResult:
        n = self.tokens
        if n == 0:
            raise LowbitError("nothing was scored")
        res = EvalResult(float(np.exp(self.nll / n)), self.nll / n, n, self.windows)
        if self.reference:
            kl = np.concatenate(self.kl)
            res.ref_nll = self.ref_nll / n
            res.ref_ppl = float(np.exp(res.ref_nll))
            res.kl_mean = float(kl.mean())
            res.kl_p99 = float(np.percentile(kl, 99))
            res.kl_max = float(kl.max())
            res.top1 = self.agree / n
        return res


def _check_logits(logits: np.ndarray, n: int, what: str) -> None:
    if logits.ndim != 2 or logits.shape[0] < n:
        raise ValueError(f"{what} logits of shape {logits.shape} for a window scoring {n} positions")


def evaluate_many(
    logits_fns: Sequence[LogitsFn],
    ids: list[int],
    ctx: int,
    bos: int,
    max_tokens: int | None = None,
    ref_logits_fn: LogitsFn | None = None,
    on_window: Callable[[int], None] | None = None,
    stride: int | None = None,
) -> list[EvalResult]:
    """Evaluate several models over the same windows, running the reference (if any) once per window.
    Each ``logits_fn(window) -> [len(window), vocab]`` logits from an empty context. ``stride``: see
    :func:`scored_windows`."""
    if count_windows(len(ids), ctx, max_tokens, stride) == 0:
        raise LowbitError(too_short_message(len(ids), ctx, max_tokens))
    accs = [Accumulator(reference=ref_logits_fn is not None) for _ in logits_fns]
    for w, (win, skip) in enumerate(scored_windows(ids, ctx, bos, max_tokens, stride), 1):
        ref = ref_logits_fn(win) if ref_logits_fn is not None else None
        for fn, acc in zip(logits_fns, accs):
            acc.add(win, fn(win), ref, skip)
        if on_window:
            on_window(w)
    return [acc.result() for acc in accs]


def evaluate(
    logits_fn: LogitsFn,
    ids: list[int],
    ctx: int,
    bos: int,
    max_tokens: int | None = None,
    ref_logits_fn: LogitsFn | None = None,
    on_window: Callable[[int], None] | None = None,
    stride: int | None = None,
) -> EvalResult:
    """Perplexity of ``logits_fn``; with ``ref_logits_fn`` also reference perplexity, KL and top-1 agreement."""
    return evaluate_many([logits_fn], ids, ctx, bos, max_tokens, ref_logits_fn, on_window, stride)[0]


def perplexity(
    logits_fn: LogitsFn,
    ids: list[int],
    ctx: int,
    bos: int,
    max_tokens: int | None = None,
    on_window: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """``logits_fn(window) -> [len(window), vocab]`` logits from an empty context."""
    r = evaluate(logits_fn, ids, ctx, bos, max_tokens, on_window=on_window)
    return PerplexityResult(r.ppl, r.nll, r.tokens, r.windows)


def too_short_message(n_ids: int, ctx: int, max_tokens: int | None) -> str:
    used = f" (--max-tokens {max_tokens})" if max_tokens and max_tokens < n_ids else ""
    return (f"text is too short: {min(n_ids, max_tokens or n_ids)} tokens{used}, need at least {ctx - 1} "
            f"for one window of context {ctx}")


# --------------------------------------------------------------------------------------------- the reference model
@contextmanager
def reference_engine(src: str, ctx: int, threads: int | None = None) -> Iterator[Engine]:
    """An engine for ``src``: a .lowbit container as it is, or a Hugging Face checkpoint (folder or hub id) or GGUF file
    converted unquantized (``--bits 16``) into a temporary container that lives as long as the context."""
    with tempfile.TemporaryDirectory(prefix="lowbit-ref-") as tmp:
        yield _open_reference(src, Path(tmp), ctx, threads)


def _open_reference(src: str, tmp: Path, ctx: int, threads: int | None) -> Engine:
    from lowbit.convert.converter import ConvertOptions, convert
    from lowbit.convert.gguf_source import is_gguf
    from lowbit.runtime.engine import Engine

    path = Path(src).expanduser()
    try:
        if path.is_file() and not is_gguf(path):
            return Engine(path, ctx=ctx, threads=threads, kv="32")  # the reference keeps a float32 cache
        if not path.exists() and (path.suffix == ".lowbit" or src.startswith((".", "/", "~"))):
            raise LowbitError(f"{src}: no such file or directory")
        log.info("converting reference %s unquantized into a temporary container", src)
        # a GGUF: its dequantized float32 weights (requantize: every tensor as a float source)
        out = convert(src, tmp / "reference.lowbit", ConvertOptions(bits=16, requantize=True), progress=False)
        # exact activations: bfloat16 weights' prompts otherwise round them to bfloat16 (kernels/cpu_half.py)
        return Engine(out, ctx=ctx, threads=threads, kv="32", exact_activations=True)
    except LowbitError as e:
        raise type(e)(f"reference {e}") from None


def check_same_tokens(model: Engine, ref: Engine, text: str, ids: list[int]) -> None:
    """Refuse a reference that does not share the model's vocabulary, BOS and tokenization of ``text``."""
    if ref.args.vocab_size != model.args.vocab_size:
        raise LowbitError(f"reference has a vocabulary of {ref.args.vocab_size} tokens, the model "
                          f"{model.args.vocab_size}; KL needs both to use the same tokenizer")
    if ref.tokenizer.bos_id != model.tokenizer.bos_id:
        raise LowbitError(f"reference's BOS token is {ref.tokenizer.bos_id}, the model's {model.tokenizer.bos_id}; "
                          "KL needs both to use the same tokenizer")
    ref_ids = ref.tokenizer.encode(text, add_special_tokens=False)
    if ref_ids != ids:
        first = next((i for i, (a, b) in enumerate(zip(ref_ids, ids)) if a != b), min(len(ids), len(ref_ids)))
        raise LowbitError(f"reference tokenizes the text differently ({len(ref_ids)} tokens vs {len(ids)}, first "
                          f"difference at token {first}); KL needs both to use the same tokenizer")
