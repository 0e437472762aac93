"""Token sampling (penalties, temperature, top-k, top-p, min-p) and stop-string matching over streamed text.

Every :class:`Sampler` owns its own ``np.random.Generator``; nothing here touches numpy's global RNG, so two
samplers with the same seed and the same inputs produce the same tokens.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

NUCLEUS_PREFILTER = (256, 4096)  # top_p first looks for the nucleus among these many most likely tokens
PENALTY_LIMIT = 2.0  # presence/frequency penalties must lie in [-PENALTY_LIMIT, PENALTY_LIMIT] (OpenAI range)


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    """How the next token is chosen. The defaults mean plain greedy decoding."""

    temperature: float = 0.0  # 0 -> greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # llama.cpp/HF: positive logits /= p, negative *= p, over prompt+generated
    presence_penalty: float = 0.0  # OpenAI: logit -= presence * (count > 0), over generated tokens
    frequency_penalty: float = 0.0  # OpenAI: logit -= frequency * count, over generated tokens
    seed: int | None = None

    @classmethod
    def from_args(cls, args) -> SamplingParams:
        """From the CLI's sampling flags (--temp --top-k --top-p --min-p --repeat-penalty --seed)."""
        return cls(
            temperature=args.temp,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repeat_penalty,
            seed=args.seed,
        )

    def validate(self) -> None:
        """Raise :class:`LowbitError` naming the first out-of-range setting."""
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_real(value):
                raise LowbitError(f"sampling: {name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise LowbitError(f"sampling: {name} must be a finite number, got {value!r}")
        if self.temperature < 0:
            raise LowbitError(f"sampling: temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not _is_int(self.top_k):
            raise LowbitError(f"sampling: top_k must be an integer, got {self.top_k!r}")
        if self.top_k < 0:
            raise LowbitError(f"sampling: top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise LowbitError(f"sampling: top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise LowbitError(f"sampling: min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise LowbitError(f"sampling: repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -PENALTY_LIMIT <= value <= PENALTY_LIMIT:
                raise LowbitError(f"sampling: {name} must be in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}], got {value}")
        if self.seed is not None:
            if not _is_int(self.seed):
                raise LowbitError(f"sampling: seed must be an integer or None, got {self.seed!r}")
            if self.seed < 0:
                raise LowbitError(f"sampling: seed must be >= 0, got {self.seed}")


class Sampler:
    """Chooses tokens from logits according to :class:`SamplingParams`, with its own seeded RNG."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        params.validate()
        if not _is_int(vocab_size) or vocab_size <= 0:
            raise LowbitError(f"sampling: vocab_size must be a positive integer, got {vocab_size!r}")
        self.params = params
        self.vocab_size = int(vocab_size)
        self.rng = np.random.default_rng(params.seed)

    # ------------------------------------------------------------------ helpers
    def _logits(self, logits: np.ndarray) -> np.ndarray:
        """A float64 copy of ``logits`` after shape and value checks (the caller's array is never modified)."""
        arr = np.asarray(logits)
        if arr.ndim != 1 or arr.shape[0] != self.vocab_size:
            raise LowbitError(f"sampling: expected logits of shape ({self.vocab_size},), got {arr.shape}")
        x = arr.astype(np.float64, copy=True)
        top = x.max()  # one pass: NaN propagates, +inf wins, and -inf means every logit is -inf
        if np.isnan(top) or top == np.inf:
            raise LowbitError("sampling: logits contain NaN or +inf")
        if top == -np.inf:
            raise LowbitError("sampling: every logit is -inf, nothing can be sampled")
        return x

    def _tokens(self, tokens: Sequence[int], what: str) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
            raise LowbitError(f"sampling: {what} token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def _apply_penalties(self, x: np.ndarray, prompt_tokens: Sequence[int], generated: Sequence[int]) -> None:
        p = self.params
        gen = self._tokens(generated, "generated")
        if p.repetition_penalty != 1.0:
            seen = np.unique(np.concatenate([self._tokens(prompt_tokens, "prompt"), gen]))
            v = x[seen]
            x[seen] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and gen.size:
            ids, counts = np.unique(gen, return_counts=True)
            x[ids] -= p.frequency_penalty * counts + p.presence_penalty

    # ------------------------------------------------------------------ public
    def penalized(self, logits: np.ndarray, prompt_tokens: Sequence[int], generated: Sequence[int]) -> np.ndarray:
        """The logits after repetition/presence/frequency penalties (a new float64 array)."""
        x = self._logits(logits)
        self._apply_penalties(x, prompt_tokens, generated)
        return x

    def sample(self, logits: np.ndarray, prompt_tokens: Sequence[int], generated: Sequence[int]) -> int:
        """Pick the next token: penalties -> temperature -> top_k -> top_p -> min_p -> draw (argmax if greedy)."""
        p = self.params
        x = self.penalized(logits, prompt_tokens, generated)
        if p.temperature == 0.0:
            return int(np.argmax(x))
        x /= p.temperature

        # Candidate ids (None = the whole vocabulary, in order) and their logits; top_k narrows them first.
        cand: np.ndarray | None = None
        vals = x
        if 0 < p.top_k < x.shape[0]:
            cand = np.argpartition(-x, p.top_k - 1)[: p.top_k]
            vals = x[cand]
        probs = np.exp(vals - vals.max())
        probs /= probs.sum()

        if p.top_p < 1.0:
            cand, probs = self._nucleus(cand, probs, p.top_p)
        if p.min_p > 0.0:
            keep = probs >= p.min_p * probs.max()
            cand = np.flatnonzero(keep) if cand is None else cand[keep]
            probs = probs[keep]

        cdf = np.cumsum(probs)
        u = self.rng.random() * cdf[-1]
        i = min(int(np.searchsorted(cdf, u, side="right")), cdf.shape[0] - 1)
        return int(cand[i]) if cand is not None else i

    @staticmethod
    def _nucleus(cand: np.ndarray | None, probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
        """Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (renormalised, descending).

        Token i (in descending order) stays when the mass strictly before it is still below top_p, so the best
        token always stays. Sorting the whole vocabulary is slow, so the best few hundred (then few thousand) tokens
        are tried first: the nucleus is a prefix of the sorted order, so it lies inside them once their mass reaches
        top_p.
        """
        ids = np.arange(probs.shape[0]) if cand is None else cand
        order = None
        for m in NUCLEUS_PREFILTER:
            if probs.shape[0] <= 2 * m:
                break
            part = np.argpartition(-probs, m - 1)[:m]
            if probs[part].sum() >= top_p:
                order = part[np.argsort(-probs[part], kind="stable")]
                break
        if order is None:
            order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order]
        before = np.cumsum(sorted_probs) - sorted_probs
        n = max(1, int(np.count_nonzero(before < top_p)))
        kept = sorted_probs[:n]
        return ids[order[:n]], kept / kept.sum()

    def logprobs(self, logits: np.ndarray, token: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
        """Log-softmax of the raw logits: the logprob of ``token`` and the ``top_n`` best (id, logprob), descending."""
        x = self._logits(logits)
        if not _is_int(token) or not 0 <= token < self.vocab_size:
            raise LowbitError(f"sampling: token id {token!r} is outside the vocabulary [0, {self.vocab_size})")
        if not _is_int(top_n) or top_n < 0:
            raise LowbitError(f"sampling: top_n must be a non-negative integer, got {top_n!r}")
        m = x.max()
        lp = x - (m + np.log(np.exp(x - m).sum()))
        n = min(int(top_n), lp.shape[0])
        if n == 0:
            return float(lp[token]), []
        best = np.argpartition(-lp, n - 1)[:n] if n < lp.shape[0] else np.arange(lp.shape[0])
        best = sorted(best.tolist(), key=lambda i: (-lp[i], i))
        return float(lp[token]), [(int(i), float(lp[i])) for i in best]


class StopMatcher:
    """Stop strings over streamed text: holds back text that could be the start of a stop string.

    The emitted text is the same however the stream is chunked: everything before the earliest-starting
    occurrence of any stop string. Text is held back only while it could still turn into a stop string.
    """

    def __init__(self, stops: Sequence[str]):
        if isinstance(stops, str):
            stops = [stops]
        clean: list[str] = []
        for s in stops:
            if not isinstance(s, str):
                raise LowbitError(f"stop strings must be text, got {s!r}")
            if s == "":
                raise LowbitError("stop strings must not be empty")
            if s not in clean:
                clean.append(s)
        self.stops = tuple(clean)
        self._longest = max((len(s) for s in self.stops), default=0)
        self._buf = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def _first_match(self) -> int:
        """Start of the earliest complete stop string in the buffer (noted in ``matched``), or -1."""
        hits = [(i, s) for i, s in ((self._buf.find(s), s) for s in self.stops) if i >= 0]
        if not hits:
            return -1
        i, self.matched = min(hits, key=lambda h: h[0])
        return i

    def _first_partial(self) -> int:
        """Start of the earliest buffer suffix that is a proper prefix of some stop string, or -1."""
        buf = self._buf
        for j in range(max(0, len(buf) - self._longest + 1), len(buf)):
            tail = buf[j:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self.stops):
                return j
        return -1

    def feed(self, text: str) -> tuple[str, bool]:
        """Add streamed text; return (text safe to emit now, whether a stop string has completed)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        self._buf += text
        match = self._first_match()
        partial = self._first_partial()
        if match >= 0 and (partial < 0 or partial >= match):
            out = self._buf[:match]
            self._buf = ""
            self.stopped = True
            return out, True
        # Either no complete stop yet, or an earlier partial one could still complete: hold from there on.
        cut = partial if partial >= 0 else len(self._buf)
        out, self._buf = self._buf[:cut], self._buf[cut:]
        return out, False

    def flush(self) -> str:
        """At the end of generation: the held-back text (up to a stop string if one is inside it)."""
        if self.stopped:
            return ""
        match = self._first_match() if self.stops else -1
        out = self._buf[:match] if match >= 0 else self._buf
        self._buf = ""
        if match >= 0:
            self.stopped = True
        return out
