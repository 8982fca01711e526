"""Prometheus metrics for one server: its own registry (no process-global state), read at scrape time.

Gauges that describe the present (queue length, jobs by status, model readiness, the last
batched step and the batching limits) are computed when scraped from the runner and the
store, so they can never drift; histograms and counters are fed as jobs and steps run.

Batching (every step is one DiT forward over all jobs in the batch):
- `ditserve_batch_size` (histogram): jobs (requests) in each batched step;
- `ditserve_batch_tokens` (histogram): DiT tokens in each batched step, all samples (a job
  with classifier-free guidance is two samples);
- `ditserve_last_batch_size`, `ditserve_last_batch_tokens` (gauges): the same for the latest step;
- `ditserve_max_batch_size` (0: no limit), `ditserve_max_batch_tokens` (gauges): the limits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ditserve.server.stats import RunnerStats

if TYPE_CHECKING:  # the engine imports torch
    from ditserve.engine.batching import StepStats

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
BATCH_TOKEN_BUCKETS = tuple(4**k for k in range(2, 11))  # 16 .. 1,048,576
JOB_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)


class _LiveGauges(Collector):
    """Queue length, jobs by status and readiness, read from their sources on every scrape."""

    def __init__(self, stats: Callable[[], RunnerStats], counts: Callable[[], dict[str, int]],
                 ready: Callable[[], bool]) -> None:
        self._stats, self._counts, self._ready = stats, counts, ready

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield GaugeMetricFamily("ditserve_queue_length", "Jobs waiting to join the batch.", value=stats.queued)
        yield GaugeMetricFamily("ditserve_queue_capacity", "Most jobs accepted and not finished (--max-queue).",
                                value=stats.capacity)
        yield GaugeMetricFamily("ditserve_jobs_running", "Jobs in the batch (or having their file written).",
                                value=stats.running)
        yield GaugeMetricFamily("ditserve_last_batch_size", "Jobs in the latest batched denoising step.",
                                value=stats.last_batch_size)
        yield GaugeMetricFamily("ditserve_last_batch_tokens", "DiT tokens in the latest batched step (all samples).",
                                value=stats.last_step_tokens)
        yield GaugeMetricFamily("ditserve_jobs_paused", "Admitted jobs that sat the latest step out (step policy).",
                                value=stats.paused)
        yield GaugeMetricFamily("ditserve_jobs_decoding", "Jobs done denoising, waiting for or in the VAE decode.",
                                value=stats.decoding)
        yield GaugeMetricFamily("ditserve_max_batch_size", "Most jobs admitted at once (--max-batch-size; 0: no limit).",
                                value=stats.max_batch_size or 0)
        if stats.max_batch_tokens is not None:
            yield GaugeMetricFamily("ditserve_max_batch_tokens", "Most DiT tokens in one step (--max-batch-tokens).",
                                    value=stats.max_batch_tokens)
        by_status = GaugeMetricFamily("ditserve_jobs", "Jobs the server holds, by status.", labels=["status"])
        for status, count in self._counts().items():
            by_status.add_metric([status], count)
        yield by_status
        yield GaugeMetricFamily("ditserve_model_ready", "1 when the model is loaded and can generate.",
                                value=float(self._ready()))


class Metrics:
    """The server's metrics; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs_submitted = Counter("ditserve_jobs_submitted", "Jobs accepted into the queue.", ["kind"],
                                      registry=self.registry)
        self.jobs_rejected = Counter("ditserve_jobs_rejected", "Job requests refused.", ["reason"],
                                     registry=self.registry)
        self.jobs_finished = Counter("ditserve_jobs_finished", "Jobs that reached a final status.", ["status"],
                                     registry=self.registry)
        self.step_seconds = Histogram("ditserve_step_seconds",
                                      "Time of one denoising step of a job (the batched step it was in).",
                                      buckets=STEP_BUCKETS, registry=self.registry)
        self.job_seconds = Histogram("ditserve_job_seconds", "Run time of a completed job (generate + write).",
                                     buckets=JOB_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("ditserve_batch_size", "Jobs in one batched denoising step.",
                                    buckets=BATCH_SIZE_BUCKETS, registry=self.registry)
        self.batch_tokens = Histogram("ditserve_batch_tokens", "DiT tokens in one batched step (all samples).",
                                      buckets=BATCH_TOKEN_BUCKETS, registry=self.registry)
        self.queue_wait_seconds = Histogram("ditserve_queue_wait_seconds", "Time a job waited before running.",
                                            buckets=JOB_BUCKETS, registry=self.registry)

    def watch(self, stats: Callable[[], RunnerStats], counts: Callable[[], dict[str, int]],
              ready: Callable[[], bool]) -> None:
        """Register the scrape-time gauges (once the runner and store exist)."""
        self.registry.register(_LiveGauges(stats, counts, ready))

    def observe_queue_wait(self, seconds: float) -> None:
        self.queue_wait_seconds.observe(max(0.0, seconds))

    def observe_step(self, step: StepStats) -> None:
        """The batching engine's `on_step` hook: one batched forward ran."""
        self.batch_size.observe(step.requests)
        self.batch_tokens.observe(step.tokens)

    def observe_job(self, timings: dict[str, Any]) -> None:
        for step in timings.get("per_step_s", ()):
            self.step_seconds.observe(step)
        self.job_seconds.observe(timings["job_s"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
