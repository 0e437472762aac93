"""The generation worker: a thread that owns the Engine and serves queued jobs, several at once (continuous
batching, runtime/scheduler.py).

The HTTP layer never touches the engine while the worker runs. It submits a :class:`Job` and reads what the worker
reports through the job's ``emit`` callback (from the worker thread), typically forwarded into an asyncio queue with
:func:`submit_async`. A job can be cancelled at any time (client gone): the worker checks between steps, so a
cancelled generation stops, and frees its slot, within one token of the request. A full queue refuses at once.

Every forward pass of a serving process runs on the worker's thread, the warm-up and the batch preparation included
(:meth:`Worker.start` waits for them). GNU OpenMP (numba's threading layer) keeps a team of threads per thread that
starts parallel regions; once two teams exist it counts more threads than cores and its idle threads stop spinning
between regions, so each of the few hundred kernel calls of a decode step waits for a sleeping thread to wake up:
measured on a 2-core host, a SmolLM2 decode step took 13-17 ms from the worker after the main thread had run one
pass, against 10-11 ms with one thread running them all.
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
from lowbit.runtime.scheduler import DEFAULT_CACHE_RAM, DEFAULT_PARALLEL, Active, Finished, Scheduler
from lowbit.runtime.sequence import SequenceState

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 64  # requests waiting beyond the running ones; more are refused with 503
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
    first_token_seconds: float | None = None  # from submission to the first generated token
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
        ignore_eos: bool = False,
        keep: int | None = None,
    ):
        self.prompt = list(prompt)
        self.keep = keep  # leading tokens a context shift keeps (None: the BOS token if the prompt starts with it)
        self.params = params
        self.max_tokens = max_tokens
        self.stop = list(stop)
        self.logprobs = logprobs
        self.constraint = constraint
        self.ignore_eos = ignore_eos
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


class Overloaded(LowbitError):
    """The queue is full; the request was not taken."""


class Worker:
    """Runs jobs in a single thread that owns ``engine``: up to ``parallel`` at once, batched by the scheduler
    (runtime/scheduler.py), the rest waiting in a queue of at most ``max_queue``."""

    def __init__(self, engine: Engine, parallel: int = DEFAULT_PARALLEL, cache_ram: int = DEFAULT_CACHE_RAM,
                 max_queue: int = DEFAULT_MAX_QUEUE, warm_up: bool = False):  # fmt: skip
        if engine.device != "cpu" and parallel > 1:
            log.warning("--parallel %d: batched decoding runs on the CPU; serving one request at a time", parallel)
            parallel = 1
        self.engine = engine
        self.stats = WorkerStats()
        self.scheduler = Scheduler(engine, parallel, cache_ram, on_event=self._on_event)
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._warm_up = warm_up  # the engine's first-reply kernels compiled (or loaded) before serving
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self.on_finish: Callable[[Job, Outcome], None] | None = None  # metrics

    # ------------------------------------------------------------------ control (any thread)
    def start(self) -> None:
        """Start the thread and wait until it is ready to serve (warmed up, weights packed for batches); an error
        of that preparation is raised here."""
        if self._thread is not None:
            return
        self._closed = False
        self._ready.clear()
        self._failed = None
        self._thread = threading.Thread(target=self._run, name="lowbit-generation", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failed is not None:
            self._thread.join()
            self._thread = None
            raise self._failed

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running jobs, refuse queued ones, and wait for the thread to end."""
        self._closed = True
        for a in list(self.scheduler.active):
            a.job.cancel()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the generation worker did not stop within %.0f s", timeout)
            self._thread = None

    def submit(self, job: Job) -> None:
        if self._closed or self._thread is None:
            raise ShuttingDown("the server is shutting down")
        if self._queue.qsize() >= self.max_queue:
            raise Overloaded(f"the server is busy: {self.max_queue} requests are already waiting; retry later")
        self._queue.put(job)

    @property
    def busy(self) -> bool:
        return bool(self.scheduler.active)

    @property
    def running(self) -> int:
        return len(self.scheduler.active)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    # ------------------------------------------------------------------ the thread
    def _prepare(self) -> bool:
        try:
            if self._warm_up:
                self.engine.warm_up()
                self._warm_up = False
            self.scheduler.prepare()
        except BaseException as e:  # noqa: BLE001 - handed to start(), which raises it in the caller's thread
            self._failed = e
        self._ready.set()
        return self._failed is None

    def _run(self) -> None:
        set_threads(self.engine.threads)  # numba's thread count is per calling thread
        if not self._prepare():
            return
        sched = self.scheduler
        while not self._closed:
            try:
                while sched.has_room:
                    job = self._queue.get(block=not sched.active)
                    if job is None:
                        break
                    self._admit(job)
            except queue.Empty:
                pass
            if self._closed:
                break
            for f in sched.step():
                self._finish(f)
        for a in list(sched.active):  # stopping: what runs ends as cancelled, what waits is refused
            a.job.cancel()
        for f in sched.step():
            self._finish(f)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit("error", ShuttingDown("the server is shutting down"))

    def _admit(self, job: Job) -> None:
        waited = time.perf_counter() - job.submitted
        if job.cancelled:
            self._count_cancel(job)
            job.emit("done", Outcome(prompt_tokens=len(job.prompt), finish_reason="cancelled", queue_seconds=waited))
            return
        engine = self.engine
        try:
            engine.check_fits(len(job.prompt), job.max_tokens)
            seq = SequenceState(engine.tokenizer, engine.eos_ids, engine.args.vocab_size, job.prompt, job.params,
                                job.max_tokens, job.stop, job.logprobs, False, job.constraint,
                                job.ignore_eos)  # fmt: skip
        except LowbitError as e:
            self.stats.failed += 1
            job.emit("error", e)
            return
        self.scheduler.admit(job, seq)

    def _on_event(self, active: Active, event) -> None:
        job = active.job
        if event.token >= 0:
            job.produced += 1
        job.emit("token", event)

    def _finish(self, f: Finished) -> None:
        a, job = f.active, f.active.job
        if f.reason == "error":
            self.stats.failed += 1
            job.emit("error", f.error)
            return
        seq, s = a.seq, self.stats
        now = time.perf_counter()
        outcome = Outcome(
            prompt_tokens=len(seq.prompt),
            cached_tokens=a.cached,
            prefilled_tokens=a.prefilled,
            completion_tokens=len(seq.generated),
            finish_reason=f.reason,
            stop_sequence=seq.stop_sequence if f.reason == "stop" else None,
            mask_seconds=job.constraint.mask_seconds if job.constraint is not None else 0.0,
            queue_seconds=a.started - job.submitted,
            run_seconds=now - a.started,
            first_token_seconds=(a.first_token - job.submitted) if a.first_token is not None else None,
        )
        s.prompt_tokens += outcome.prompt_tokens
        s.prefilled_tokens += outcome.prefilled_tokens
        s.cached_tokens += outcome.cached_tokens
        s.generated_tokens += outcome.completion_tokens
        if f.reason == "cancelled":
            self._count_cancel(job)
        else:
            s.completed += 1
        if self.on_finish is not None:
            self.on_finish(job, outcome)
        job.emit("done", outcome)

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
    ignore_eos: bool = False,
    keep: int | None = None,
) -> tuple[Job, asyncio.Queue]:
    """Submit a job whose reports arrive in an asyncio queue of the running loop as (kind, payload) pairs."""
    loop = asyncio.get_running_loop()
    reports: asyncio.Queue = asyncio.Queue()

    def emit(kind: str, payload: Any) -> None:
        loop.call_soon_threadsafe(reports.put_nowait, (kind, payload))

    job = Job(prompt, params, max_tokens, stop, logprobs, emit, constraint, ignore_eos, keep)
    worker.submit(job)
    return job, reports
