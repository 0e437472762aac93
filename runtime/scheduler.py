"""Continuous batching: several generations advance together, one batched forward pass per decode step.

The scheduler owns a pool of KV-cache *slots*. A request joins between steps when fewer than ``parallel`` run; it
takes the idle slot whose cached tokens share the longest prefix with its prompt (any earlier conversation, not only
the last one), so only the rest of its prompt is computed. Each :meth:`Scheduler.step`:

1. prefills the next chunk of the requests still reading their prompts, oldest first, as many as fit in
   ``prefill_chunk`` tokens together (at least one), in one forward pass of prompt kernels whose rows do not depend
   on what shares the pass (each sequence gets the numbers of its own prefill, chunked as ``Engine.prefill``
   chunks), so requests arriving together start together and a long prompt never stalls the others for more than
   one chunk;
2. advances every decoding sequence by one token, in forward passes of at most ``dispatch.SMALL_BATCH`` rows: with
   the weights packed for batches (kernels/packed.py, where the CPU has the byte dot product) a pass runs as the
   prompt GEMM, reading each weight once for all rows (a sequence's logits then differ from its lone decode by
   float rounding, KL ~1e-7 with exact activations); otherwise the small-batch kernel computes every row exactly
   as a lone decode step would.

Idle slots keep their tokens for reuse while all slots' caches together stay within ``cache_ram`` bytes (each cache
counted by what it holds: it grows with its positions, kernels/kv_cache.py); beyond, the least recently used idle
ones are freed.
Requests carry their own sampling settings, stop strings, logprobs and grammar (runtime/sequence.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lowbit.kernels import dispatch
from lowbit.models.common import Segments
from lowbit.runtime.engine import shift_tokens
from lowbit.runtime.sequence import SequenceState, common_prefix

log = logging.getLogger(__name__)

DEFAULT_PARALLEL = 4
DEFAULT_CACHE_RAM = 2 << 30  # bytes of keys/values idle slots may keep for prefix reuse


@dataclass
class Slot:
    """One KV cache and the tokens whose keys/values it holds (in order)."""

    cache: Any = None
    tokens: list[int] = field(default_factory=list)
    # how many leading tokens a prompt pass computed: only those are reused (as in engine.Engine.prefill); a reuse
    # is also bounded by the tokens held, so a stale count after the tokens were cleared does no harm
    prompted: int = 0
    last_used: float = 0.0
    busy: bool = False


@dataclass
class Active:
    """A request being served: its slot, the prompt tokens still to compute, its sequence state and counters."""

    job: Any
    seq: SequenceState
    slot: Slot
    pending: list[int]
    cached: int
    started: float
    prefilled: int = 0
    first_token: float | None = None
    shifted: int = 0  # tokens context shifts dropped


@dataclass
class Finished:
    active: Active
    reason: str  # stop | length | cancelled | error
    error: BaseException | None = None


class Scheduler:
    def __init__(self, engine, parallel: int = DEFAULT_PARALLEL, cache_ram: int = DEFAULT_CACHE_RAM,
                 on_event: Callable[[Active, Any], None] | None = None):  # fmt: skip
        self.engine = engine
        self.model = engine.model
        self.parallel = max(1, int(parallel))
        self.cache_ram = int(cache_ram)
        self.prefill_chunk = engine.prefill_chunk
        self.slots: list[Slot] = []
        self.active: list[Active] = []
        self.on_event = on_event or (lambda active, event: None)
        self.on_batch: Callable[[int], None] = lambda rows: None  # each decode pass's rows (metrics)

    def prepare(self) -> None:
        """With several slots: the weights unpacked for batched decoding and a batched pass's kernels compiled (or
        loaded), so that the first concurrent clients do not wait for them. Call it on the thread that will step
        (the worker's): see runtime/server/worker.py on why all forward passes keep to one thread."""
        if self.parallel == 1:
            return
        pack = getattr(self.model, "pack_for_batches", None)
        if pack is not None:
            t0 = time.perf_counter()
            added = pack()
            if added:
                log.info("weights unpacked for batched decoding: %.0f MB in %.1f s", added / 2**20,
                         time.perf_counter() - t0)  # fmt: skip
        self.engine.warm_up_batches()

    def _new_slot(self) -> Slot:
        """A new slot with an empty cache (which takes memory as its positions are written)."""
        slot = Slot(cache=self.model.new_cache())
        self.slots.append(slot)
        return slot

    # ------------------------------------------------------------------ admission
    @property
    def has_room(self) -> bool:
        return len(self.active) < self.parallel

    def _slot_for(self, prompt: list[int]) -> tuple[Slot, int]:
        """The slot to serve ``prompt`` from and how many of its tokens are reused. A prompt that extends all a
        slot holds takes that slot; one that shares only a part of it (a system prompt, an earlier turn) gets a
        copy of that part in another slot, so the longer conversation stays cached for its own next turn."""
        idle = [s for s in self.slots if not s.busy]
        best, reuse = None, 0
        for s in idle:
            n = min(common_prefix(s.tokens, prompt), len(prompt) - 1, s.prompted)
            if n > reuse and s.cache.can_rewind(len(s.tokens), n):  # (a sliding window's ring may not go back far)
                best, reuse = s, n
        if best is not None and (reuse == len(best.tokens) or common_prefix(best.tokens, prompt) == len(prompt)
                                 or reuse == best.prompted):  # what follows were decode steps: computed again
            return best, reuse  # the prompt extends all the slot holds, or lies within it (a reply asked again)
        fresh = self._fresh_slot(idle, keep=best)
        if fresh is None:  # no other slot to be had: the partial match gives up its tail
            return best, reuse
        if best is not None:
            fresh.cache.copy_prefix(best.cache, reuse)
            fresh.tokens = best.tokens[:reuse]
            fresh.prompted = reuse
        return fresh, reuse

    def _fresh_slot(self, idle: list[Slot], keep: Slot | None) -> Slot | None:
        """An empty slot: an unused one, a new one while the cache budget allows, else the least recently used
        idle conversation's (never ``keep``'s)."""
        empty = [s for s in idle if not s.tokens]
        if empty:
            slot = empty[0]  # (every slot has its cache: _new_slot makes it, _evict drops slots without)
        elif not idle or self._held() < self.cache_ram:
            return self._new_slot()
        else:
            others = [s for s in idle if s is not keep]
            if not others:
                return None
            slot = min(others, key=lambda s: s.last_used)
            slot.tokens = []
        return slot

    def admit(self, job, seq: SequenceState) -> Active:
        prompt = seq.prompt
        slot, reuse = self._slot_for(prompt)
        slot.busy = True
        slot.tokens = prompt[:reuse]
        slot.prompted = reuse
        active = Active(job, seq, slot, prompt[reuse:], reuse, time.perf_counter())
        self.active.append(active)
        return active

    # ------------------------------------------------------------------ stepping
    def drop(self, active: Active) -> None:
        self.active.remove(active)
        slot = active.slot
        slot.busy = False
        slot.last_used = time.perf_counter()
        self._evict()

    def _held(self) -> int:
        """Bytes the slots' caches hold (a CPU cache grows with the positions written: kernels/kv_cache.py)."""
        return sum(s.cache.nbytes for s in self.slots if s.cache is not None)

    def held_bytes(self) -> int:
        return self._held()

    def _evict(self) -> None:
        """Free least recently used idle slots while the cached keys/values exceed the budget."""
        idle = sorted((s for s in self.slots if not s.busy and s.cache is not None), key=lambda s: s.last_used)
        while idle and self._held() > self.cache_ram:
            s = idle.pop(0)
            s.cache, s.tokens = None, []
        self.slots = [s for s in self.slots if s.busy or s.cache is not None]

    @property
    def cached_sequences(self) -> int:
        return sum(1 for s in self.slots if s.tokens)

    def step(self) -> list[Finished]:
        """One round: a prefill chunk, then a decode step for every decoding sequence. Returns what ended."""
        finished: list[Finished] = []
        for a in [a for a in self.active if a.job.cancelled]:
            finished.append(Finished(a, "cancelled"))
            self.drop(a)
        prefilling = [a for a in self.active if a.pending]
        decoding = [a for a in self.active if not a.pending]
        if prefilling:
            finished += self._prefill(self._prefill_group(prefilling))
        for i in range(0, len(decoding), dispatch.SMALL_BATCH):
            finished += self._decode(decoding[i : i + dispatch.SMALL_BATCH])
        return finished

    def _guard(self, group: list[Active], fn) -> list[Finished]:
        try:
            return fn()
        except Exception as e:  # a failed pass ends its requests, not the server
            log.exception("generation failed")
            out = []
            for a in group:
                a.slot.tokens = []  # the cache may hold a half-computed pass
                if a in self.active:
                    self.drop(a)
                out.append(Finished(a, "error", e))
            return out

    def _prefill_group(self, prefilling: list[Active]) -> list[tuple[Active, list[int]]]:
        """The prompt chunks of the next prefill pass: the oldest request's next chunk, then the others' (each up to
        a whole chunk and within what its cache takes in one pass) while the total stays within prefill_chunk."""
        group, room = [], self.prefill_chunk
        for a in prefilling:
            n = min(len(a.pending), self.prefill_chunk, getattr(a.slot.cache, "max_tokens", self.prefill_chunk))
            if group and n > room:
                break
            group.append((a, a.pending[:n]))
            room -= n
        return group

    def _prefill(self, group: list[tuple[Active, list[int]]]) -> list[Finished]:
        def run():
            starts = [len(a.slot.tokens) for a, _ in group]
            tokens = np.array([t for _, chunk in group for t in chunk])
            if len(group) == 1:
                a = group[0][0]
                logits = self.model.forward(tokens, starts[0], a.slot.cache, prompt=True)
            else:
                segs = Segments([a.slot.cache for a, _ in group], starts, [len(chunk) for _, chunk in group])
                logits = self.model.forward(tokens, None, segs, prompt=True)
            out = []
            for (a, chunk), row in zip(group, logits):
                a.slot.tokens += chunk
                a.slot.prompted = len(a.slot.tokens)
                a.pending = a.pending[len(chunk) :]
                a.prefilled += len(chunk)
                if not a.pending:
                    out += self._advance(a, row)
            return out

        return self._guard([a for a, _ in group], run)

    def _decode(self, group: list[Active]) -> list[Finished]:
        def run():
            for a in group:
                if len(a.slot.tokens) >= self.engine.ctx:  # only with --context-shift (Engine.check_fits)
                    keep = a.job.keep if a.job.keep is not None else self.engine.keep_tokens(a.job.prompt)
                    a.slot.tokens, dropped = shift_tokens(self.model, a.slot.cache, a.slot.tokens, keep)
                    a.slot.prompted = min(a.slot.prompted, keep)
                    a.shifted += dropped
            tokens = [a.seq.generated[-1] for a in group]
            if len(group) == 1:  # the plain step (a device computes only this)
                logits = self.model.forward(np.array(tokens), len(group[0].slot.tokens), group[0].slot.cache)
            else:
                starts = [len(a.slot.tokens) for a in group]
                segs = Segments([a.slot.cache for a in group], starts, [1] * len(group))
                logits = self.model.forward(np.array(tokens), None, segs)
            self.on_batch(len(group))
            out = []
            for a, t, row in zip(group, tokens, logits):
                a.slot.tokens.append(t)
                out += self._advance(a, row)
            return out

        return self._guard(group, run)

    def _advance(self, a: Active, logits: np.ndarray) -> list[Finished]:
        try:
            events = a.seq.step(logits)
        except Exception as e:  # noqa: BLE001 - a sequence whose step fails ends alone; the batch goes on
            self.drop(a)
            return [Finished(a, "error", e)]
        if a.first_token is None:
            a.first_token = time.perf_counter()
        for ev in events:
            self.on_event(a, ev)
        if a.seq.done:
            self.drop(a)
            return [Finished(a, a.seq.finish_reason)]
        return []
