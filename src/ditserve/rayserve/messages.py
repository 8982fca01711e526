"""What the ingress, the job hub and the generator replicas send each other (plain, picklable data)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ditserve.server.jobs import JobSnapshot
from ditserve.server.stats import RunnerStats

__all__ = ["Admission", "ClusterView", "Observation", "Progress", "ReplicaReport", "RunOrder"]


@dataclass(frozen=True)
class RunOrder:
    """Run this job (the hub's snapshot: id, request with any input image, owner, creation time); `attempt`
    counts the runs of it so far, this one included."""

    job: JobSnapshot
    attempt: int


@dataclass(frozen=True)
class Admission:
    """The hub's answer to a new job: accepted (`status` None), or an HTTP status, code and message to refuse it with."""

    status: int | None = None
    code: str = ""
    message: str = ""
    retry_after_s: float | None = None

    @property
    def accepted(self) -> bool:
        return self.status is None


@dataclass(frozen=True)
class Progress:
    """A running job on a replica: denoising step `step` of `total` in run `attempt`."""

    job_id: str
    attempt: int
    step: int
    total: int


Observation = tuple  # ("queue_wait", s) | ("step", requests, tokens) | ("job", per_step_s, job_s)


@dataclass(frozen=True)
class ReplicaReport:
    """A generator replica's heartbeat: its runner's counts, its running jobs' progress and the metric
    observations made since the last report (so the endpoint's histograms cover every replica)."""

    replica_id: str
    node_id: str
    pid: int
    stats: RunnerStats
    progress: tuple[Progress, ...] = ()
    observations: tuple[Observation, ...] = ()


@dataclass(frozen=True)
class ClusterView:
    """What /health reads (cached by the ingress): the jobs' counts over every replica, and the replicas
    heard from recently (replica id -> its last report)."""

    stats: RunnerStats
    replicas: dict[str, ReplicaReport] = field(default_factory=dict)

    @property
    def live_replicas(self) -> int:
        return len(self.replicas)
