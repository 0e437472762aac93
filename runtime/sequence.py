"""One generation's state between forward passes: sampling, the grammar, stop strings and streamed text.

:class:`SequenceState` turns the logits of each step into :class:`Event`s and decides when the generation ends. The
engine's single-sequence loop (``Engine.generate``) and the server's batch scheduler (runtime/scheduler.py) both drive
it, so a reply is the same text whichever computed it.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import numpy as np

from lowbit.runtime.constraint import Constraint
from lowbit.runtime.sampling import Sampler, SamplingParams, StopMatcher


def common_prefix(a: Seq[int], b: Seq[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share (what a KV cache holding ``a`` can reuse of ``b``)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Event:
    token: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


class SequenceState:
    """Chooses a generation's tokens from logits. ``step`` returns the events to emit; ``done`` says it ended
    (``finish_reason`` stop | length, ``stop_sequence`` the stop string that ended it); ``generated[-1]`` is the next
    token to feed the model otherwise."""

    def __init__(
        self,
        tokenizer,
        eos_ids: set[int],
        vocab_size: int,
        prompt: Seq[int],
        params: SamplingParams,
        max_tokens: int,
        stop: Seq[str] = (),
        logprobs: int | None = None,
        continuation: bool = False,
        constraint: Constraint | None = None,
        ignore_eos: bool = False,
    ):
        self.prompt = list(prompt)
        self.banned = np.array(sorted(eos_ids), dtype=np.int64) if ignore_eos and eos_ids else None
        self.eos_ids = eos_ids
        self.max_tokens = max_tokens
        self.logprobs = logprobs
        self.constraint = constraint
        self.sampler = Sampler(params, vocab_size)
        self.stopper = StopMatcher(list(stop))
        self.detok = tokenizer.stream_decoder(context=self.prompt[-1:] if continuation else ())
        self.generated: list[int] = []
        self.done = False
        self.finish_reason = ""
        self.stop_sequence: str | None = None

    def _end(self, reason: str) -> list[Event]:
        self.done, self.finish_reason = True, reason
        return []

    def step(self, logits: np.ndarray) -> list[Event]:
        """Pick the next token from ``logits`` (the last position's) and return what to emit."""
        raw = logits
        if self.banned is not None:
            logits = np.array(logits, dtype=np.float32, copy=True)
            logits[self.banned[self.banned < logits.shape[0]]] = -np.inf
        if self.constraint is not None:
            logits = self.constraint.apply(logits)
        tok = self.sampler.sample(logits, self.prompt, self.generated)
        if self.constraint is not None:
            self.constraint.advance(tok)
        lp, top = (None, [])
        if self.logprobs is not None:
            lp, top = self.sampler.logprobs(raw, tok, self.logprobs)
        self.generated.append(tok)
        stopper, detok = self.stopper, self.detok
        if tok in self.eos_ids:
            self._end("stop")
            tail = stopper.flush() + detok.flush()
            return [Event(-1, tail)] if tail else []
        text, stopped = stopper.feed(detok.add(tok))
        events = [Event(tok, text, lp, top)]
        if stopped or (self.constraint is not None and self.constraint.done):
            self._end("stop")
            if stopped:
                self.stop_sequence = stopper.matched
            else:
                tail = stopper.flush() + detok.flush()
                if tail:
                    events.append(Event(-1, tail))
            return events
        if len(self.generated) >= self.max_tokens:
            self._end("length")
            tail_text, stopped = stopper.feed(detok.flush())
            tail = tail_text + ("" if stopped else stopper.flush())
            if tail:
                events.append(Event(-1, tail))
        return events
