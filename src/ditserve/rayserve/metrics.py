"""Metrics over many replicas: each replica records its observations and sends them with its heartbeat;
the hub replays them into one `ditserve.server.metrics.Metrics`, so the endpoint's /metrics has the
same histograms and counters as one server's, over every replica, plus per-replica gauges and the
replica losses and re-queued jobs.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ditserve.rayserve.messages import Observation, ReplicaReport
from ditserve.server.metrics import Metrics

__all__ = ["ClusterMetrics", "RecordingMetrics", "replay"]

MAX_PENDING = 10_000  # observations a replica keeps while the hub cannot be reached (oldest dropped)


@dataclass(frozen=True)
class _Step:
    """A batched step as `Metrics.observe_step` reads it."""

    requests: int
    tokens: int


class RecordingMetrics(Metrics):
    """A replica's metrics, which also keep what they observed until `drain()` hands it to the hub."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._pending: deque[Observation] = deque(maxlen=MAX_PENDING)

    def observe_queue_wait(self, seconds: float) -> None:
        super().observe_queue_wait(seconds)
        self._add(("queue_wait", float(seconds)))

    def observe_step(self, step: Any) -> None:
        super().observe_step(step)
        self._add(("step", int(step.requests), int(step.tokens)))

    def observe_job(self, timings: dict[str, Any]) -> None:
        super().observe_job(timings)
        self._add(("job", tuple(float(s) for s in timings.get("per_step_s", ())), float(timings["job_s"])))

    def drain(self) -> tuple[Observation, ...]:
        with self._lock:
            out = tuple(self._pending)
            self._pending.clear()
        return out

    def _add(self, observation: Observation) -> None:
        with self._lock:
            self._pending.append(observation)


def replay(metrics: Metrics, observations: Iterable[Observation]) -> None:
    """Feed a replica's observations into the endpoint's metrics."""
    for kind, *values in observations:
        if kind == "queue_wait":
            metrics.observe_queue_wait(values[0])
        elif kind == "step":
            metrics.observe_step(_Step(values[0], values[1]))
        elif kind == "job":
            metrics.observe_job({"per_step_s": values[0], "job_s": values[1]})


class _ReplicaGauges(Collector):
    """Per-replica gauges, read from the replicas' latest heartbeats at scrape time."""

    def __init__(self, replicas: Callable[[], dict[str, ReplicaReport]]) -> None:
        self._replicas = replicas

    def collect(self) -> Iterator[Metric]:
        replicas = self._replicas()
        yield GaugeMetricFamily("ditserve_replicas", "Generator replicas heard from in the last few seconds.",
                                value=len(replicas))
        families = {
            "queued": GaugeMetricFamily("ditserve_replica_queue_length", "Jobs waiting in a replica's engine.",
                                        labels=["replica"]),
            "running": GaugeMetricFamily("ditserve_replica_jobs_running", "Jobs in a replica's batch.",
                                         labels=["replica"]),
            "last_batch_size": GaugeMetricFamily("ditserve_replica_last_batch_size",
                                                 "Jobs in a replica's latest batched step.", labels=["replica"]),
        }
        for replica_id, report in sorted(replicas.items()):
            for name, family in families.items():
                family.add_metric([replica_id], getattr(report.stats, name))
        yield from families.values()


class ClusterMetrics(Metrics):
    """The endpoint's metrics (kept by the hub): one server's, fed by every replica, and the replicas' own."""

    def __init__(self, replicas: Callable[[], dict[str, ReplicaReport]]) -> None:
        super().__init__()
        self.registry.register(_ReplicaGauges(replicas))
        self.replicas_lost = Counter("ditserve_replicas_lost", "Runs of a job cut short by their replica's death.",
                                     registry=self.registry)
        self.jobs_requeued = Counter("ditserve_jobs_requeued", "Jobs queued again after their replica died.",
                                     ["reason"], registry=self.registry)
