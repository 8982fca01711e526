"""Prometheus metrics for one server: its own registry (no process-global state), read at scrape time.

Gauges that describe the present (queue length, jobs by status, model readiness) are
computed when scraped from the runner and the store, so they can never drift; histograms
and counters are fed by the worker as jobs run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ditserve.server.runner import RunnerStats

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
JOB_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)


class _LiveGauges(Collector):
    """Queue length, jobs by status and readiness, read from their sources on every scrape."""

    def __init__(self, stats: Callable[[], RunnerStats], counts: Callable[[], dict[str, int]],
                 ready: Callable[[], bool]) -> None:
        self._stats, self._counts, self._ready = stats, counts, ready

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield GaugeMetricFamily("ditserve_queue_length", "Jobs waiting to run.", value=stats.queued)
        yield GaugeMetricFamily("ditserve_queue_capacity", "Most jobs that may wait (--max-queue).",
                                value=stats.capacity)
        yield GaugeMetricFamily("ditserve_jobs_running", "Jobs running on the device.", value=stats.running)
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
        self.step_seconds = Histogram("ditserve_step_seconds", "Time of one denoising step.",
                                      buckets=STEP_BUCKETS, registry=self.registry)
        self.job_seconds = Histogram("ditserve_job_seconds", "Run time of a completed job (generate + write).",
                                     buckets=JOB_BUCKETS, registry=self.registry)
        self.queue_wait_seconds = Histogram("ditserve_queue_wait_seconds", "Time a job waited before running.",
                                            buckets=JOB_BUCKETS, registry=self.registry)

    def watch(self, stats: Callable[[], RunnerStats], counts: Callable[[], dict[str, int]],
              ready: Callable[[], bool]) -> None:
        """Register the scrape-time gauges (once the runner and store exist)."""
        self.registry.register(_LiveGauges(stats, counts, ready))

    def observe_queue_wait(self, seconds: float) -> None:
        self.queue_wait_seconds.observe(max(0.0, seconds))

    def observe_job(self, timings: dict[str, Any]) -> None:
        for step in timings.get("per_step_s", ()):
            self.step_seconds.observe(step)
        self.job_seconds.observe(timings["job_s"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
