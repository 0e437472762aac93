"""The one generation worker: a thread that owns the Engine and runs queued jobs one at a time.

The HTTP layer never touches the engine while the worker runs. It submits a :class:`Job` and reads what the worker
reports through the job's ``emit`` callback (from the worker thread), typically forwarded into an asyncio queue with
:func:`submit_async`. A job can be cancelled at any time (client gone): the worker checks between tokens, so a
cancelled generation stops within one token of the request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lowbit.errors import LowbitError
from lowbit.runtime.constraint import Constraint
from lowbit.runtime.engine import Engine, set_threads
from lowbit.runtime.sampling import SamplingParams

log = logging.getLogger(__name__)

Emit = Callable[[str, Any], None]  # ("token", Event) | ("done", Outcome) | ("error", Exception)


class ShuttingDown(LowbitError):
    """The server is stopping; the job was not run."""


@dataclass
class Outcome:
    """How a job ended (the worker's last report for it)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the KV cache
    prefilled_tokens: int = 0  # prompt tokens computed
    completion_tokens: int = 0  # generated tokens, the end-of-sequence token included
    finish_reason: str = ""  # stop | length | cancelled
    stop_sequence: str | None = None  # the stop string that ended the text, if one did
    mask_seconds: float = 0.0  # time spent on grammar masks
    queue_seconds: float = 0.0
    run_seconds: float = 0.0


@dataclass
class WorkerStats:
    """Counters since the worker started (shown by /health)."""

    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    prefilled_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    last_cancel_tokens: int | None = None  # tokens the last cancelled generation produced in all
    last_cancel_overrun: int | None = None  # of those, how many after it was cancelled

    def as_dict(self) -> dict:
        return asdict(self)


class Job:
    """One generation request, as the worker sees it."""

    def __init__(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        max_tokens: int,
        stop: Sequence[str],
        logprobs: int | None,
        emit: Emit,
        constraint: Constraint | None = None,
    ):
        self.prompt = list(prompt)
        self.params = params
        self.max_tokens = max_tokens
        self.stop = list(stop)
        self.logprobs = logprobs
        self.constraint = constraint
        self._emit = emit
        self._cancel = threading.Event()
        self.produced = 0  # tokens handed to emit so far
        self.produced_at_cancel: int | None = None
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        """Ask the worker to stop this job (or never start it). Safe from any thread, idempotent."""
        if not self._cancel.is_set():
            self.produced_at_cancel = self.produced
            self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def emit(self, kind: str, payload: Any) -> None:
        try:
            self._emit(kind, payload)
        except RuntimeError:  # the event loop that waited for this job is gone
            self.cancel()


class Worker:
    """Runs jobs from a queue in a single thread that owns ``engine`` (and its KV cache, for prefix reuse)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.stats = WorkerStats()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._current: Job | None = None
        self._closed = False

    # ------------------------------------------------------------------ control (any thread)
    def start(self) -> None:
        if self._thread is not None:
            return
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="lowbit-generation", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running job, refuse queued ones, and wait for the thread to end."""
        self._closed = True
        current = self._current
        if current is not None:
            current.cancel()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the generation worker did not stop within %.0f s", timeout)
            self._thread = None

    def submit(self, job: Job) -> None:
        if self._closed or self._thread is None:
            raise ShuttingDown("the server is shutting down")
        self._queue.put(job)

    @property
    def busy(self) -> bool:
        return self._current is not None

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        set_threads(self.engine.threads)  # numba's thread count is per calling thread
        while True:
            job = self._queue.get()
            if job is None:
                break
            if self._closed:
                job.emit("error", ShuttingDown("the server is shutting down"))
                continue
            self._current = job
            try:
                self._run_job(job)
            except Exception as e:  # never let one request kill the worker
                log.exception("generation failed")
                self.stats.failed += 1
                self.engine.reset()  # the cache may hold keys/values of a half-computed forward
                job.emit("error", e)
            finally:
                self._current = None
        while True:  # refuse what is left
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit("error", ShuttingDown("the server is shutting down"))

    def _run_job(self, job: Job) -> None:
        started = time.perf_counter()
        waited = started - job.submitted
        if job.cancelled:
            self._count_cancel(job)
            job.emit("done", Outcome(finish_reason="cancelled", queue_seconds=waited))
            return
        engine = self.engine
        gen = engine.generate(job.prompt, job.params, job.max_tokens, job.stop, logprobs=job.logprobs,
                              constraint=job.constraint)  # fmt: skip
        cancelled = False
        try:
            for event in gen:
                if event.token >= 0:
                    job.produced += 1
                job.emit("token", event)
                if job.cancelled:  # checked before the next token is computed
                    cancelled = True
                    break
        except LowbitError as e:
            self.stats.failed += 1
            engine.reset()
            job.emit("error", e)
            return
        finally:
            gen.close()
        st = engine.stats
        s = self.stats
        s.prompt_tokens += st.prompt_tokens
        s.prefilled_tokens += st.prefilled_tokens
        s.cached_tokens += st.reused_tokens
        s.generated_tokens += st.generated_tokens
        if cancelled:
            self._count_cancel(job)
        else:
            s.completed += 1
        job.emit(
            "done",
            Outcome(
                prompt_tokens=st.prompt_tokens,
                cached_tokens=st.reused_tokens,
                prefilled_tokens=st.prefilled_tokens,
                completion_tokens=st.generated_tokens,
                finish_reason="cancelled" if cancelled else st.finish_reason,
                stop_sequence=None if cancelled else st.stop_sequence,
                mask_seconds=job.constraint.mask_seconds if job.constraint is not None else 0.0,
                queue_seconds=waited,
                run_seconds=time.perf_counter() - started,
            ),
        )

    def _count_cancel(self, job: Job) -> None:
        self.stats.cancelled += 1
        self.stats.last_cancel_tokens = job.produced
        self.stats.last_cancel_overrun = job.produced - (job.produced_at_cancel or 0)
        log.debug("cancelled after %d tokens (%d after the cancel)", job.produced, self.stats.last_cancel_overrun)


def submit_async(
    worker: Worker,
    prompt: Sequence[int],
    params: SamplingParams,
    max_tokens: int,
    stop: Sequence[str],
    logprobs: int | None,
    constraint: Constraint | None = None,
) -> tuple[Job, asyncio.Queue]:
    """Submit a job whose reports arrive in an asyncio queue of the running loop as (kind, payload) pairs."""
    loop = asyncio.get_running_loop()
    reports: asyncio.Queue = asyncio.Queue()

    def emit(kind: str, payload: Any) -> None:
        loop.call_soon_threadsafe(reports.put_nowait, (kind, payload))

    job = Job(prompt, params, max_tokens, stop, logprobs, emit, constraint)
    worker.submit(job)
    return job, reports
