"""``GET /metrics``: Prometheus text format (prometheus-client, one registry per app, no process-wide state).

Counters: requests by outcome, prompt / cached / prefilled / generated tokens. Gauges (read when scraped): queue
depth, running sequences, the last decode batch size, cached conversations and cache bytes. Histograms: time to
first token, request duration, queue wait, decode batch size.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from lowbit.runtime.server.worker import Job, Outcome, Worker

LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, worker: Worker):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("lowbit_requests", "Generations ended, by finish reason", ["finish"], registry=r)
        self.tokens = Counter("lowbit_tokens", "Tokens by kind (prompt, cached, prefilled, generated)", ["kind"],
                              registry=r)  # fmt: skip
        self.ttft = Histogram("lowbit_time_to_first_token_seconds", "Submission to first generated token",
                              buckets=LATENCY, registry=r)  # fmt: skip
        self.duration = Histogram("lowbit_request_duration_seconds", "Submission to the last token",
                                  buckets=LATENCY, registry=r)  # fmt: skip
        self.wait = Histogram("lowbit_queue_wait_seconds", "Time waiting for a slot", buckets=LATENCY, registry=r)
        self.batch = Histogram("lowbit_decode_batch_size", "Sequences per decode pass",
                               buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)  # fmt: skip
        sched = worker.scheduler
        Gauge("lowbit_queue_depth", "Requests waiting", registry=r).set_function(lambda: worker.queued)
        Gauge("lowbit_running_sequences", "Sequences being generated", registry=r).set_function(lambda: worker.running)
        Gauge("lowbit_parallel_slots", "Most sequences generated at once", registry=r).set_function(
            lambda: sched.parallel
        )
        Gauge("lowbit_cached_conversations", "KV-cache slots holding tokens for reuse", registry=r).set_function(
            lambda: sched.cached_sequences
        )
        Gauge("lowbit_kv_cache_bytes", "Bytes of keys/values the slots hold", registry=r).set_function(sched.held_bytes)
        worker.on_finish = self.finished
        sched.on_batch = self.batch.observe

    def finished(self, job: Job, o: Outcome) -> None:
        self.requests.labels(o.finish_reason).inc()
        for kind, n in (("prompt", o.prompt_tokens), ("cached", o.cached_tokens), ("prefilled", o.prefilled_tokens),
                        ("generated", o.completion_tokens)):  # fmt: skip
            self.tokens.labels(kind).inc(n)
        if o.first_token_seconds is not None:
            self.ttft.observe(o.first_token_seconds)
        self.duration.observe(o.queue_seconds + o.run_seconds)
        self.wait.observe(o.queue_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
