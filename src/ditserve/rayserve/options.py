"""How many generator replicas, how they scale and what each holds: checked before anything starts.

A replica holds one pipeline and its batching engine on its own device: `gpus` GPUs (1 by
default where the model runs on CUDA, `--num-gpus` with several ranks per replica), or `cpus`
CPU cores with `threads` torch threads. With
`min_replicas < max_replicas` Serve's autoscaler keeps the jobs in flight per replica (queued
at the router or in a replica's batch) near `target_jobs`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["HUB_NAMESPACE", "RayOptions"]

HUB_NAMESPACE = "ditserve"  # the Ray namespace of the job hub actors


@dataclass(frozen=True)
class RayOptions:
    """replicas: generator replicas at start (fixed unless min/max differ; default min_replicas).
    min_replicas / max_replicas: the autoscaling range (--min-replicas, --max-replicas).
    target_jobs: jobs in flight per replica the autoscaler aims for (--target-jobs-per-replica).
    gpus / cpus: Ray resources each generator replica reserves (its device); threads: torch
        intra-op threads per replica (default: cpus).
    ingress_replicas: HTTP front replicas (stateless; any answers for any job).
    max_attempts: runs of one job before a replica death fails it (1: never re-queued).
    address: an existing Ray cluster (`auto`, `ray://host:10001`); None starts one here.
    app_name: the Serve application name (also names the job hub actor).
    upscale_delay_s / downscale_delay_s / look_back_s: the autoscaler's reaction times.
    drain_timeout_s: how long a replica being removed may finish its jobs before it is stopped
        (its unfinished jobs are then re-queued).
    ranks: each replica's split over its own ranks, (CFG, Ulysses, ring) degrees (`--num-gpus` with
        `--cfg-parallel` / `--ulysses-degree` / `--ring-degree`); (1, 1, 1): one process.
    """

    replicas: int | None = None
    min_replicas: int = 1
    max_replicas: int = 1
    target_jobs: float = 4.0
    gpus: float = 0.0
    cpus: float = 1.0
    threads: int | None = None
    ingress_replicas: int = 1
    max_attempts: int = 2
    address: str | None = None
    app_name: str = "ditserve"
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0
    look_back_s: float = 10.0
    drain_timeout_s: float = 120.0
    ranks: tuple[int, int, int] = (1, 1, 1)

    def __post_init__(self) -> None:
        if len(self.ranks) != 3 or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in self.ranks):
            raise ValueError(f"ranks must be three degrees >= 1 (CFG, Ulysses, ring), got {self.ranks!r}")
        if self.replicas is not None and (not isinstance(self.replicas, int) or self.replicas < 1):
            raise ValueError(f"--replicas must be an int >= 1, got {self.replicas!r}")
        for name, flag, low in (("min_replicas", "--min-replicas", 0), ("max_replicas", "--max-replicas", 1),
                                ("ingress_replicas", "--ingress-replicas", 1), ("max_attempts", "--max-attempts", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{flag} must be an int >= {low}, got {value!r}")
        world = math.prod(self.ranks)
        if world > 1 and self.gpus and self.gpus != world:
            raise ValueError(f"--replica-gpus ({self.gpus:g}) must be --num-gpus ({world}): a replica's ranks take one GPU "
                             f"each (or 0 GPUs on CPU)")
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"--max-replicas ({self.max_replicas}) must be >= --min-replicas ({self.min_replicas})")
        if self.replicas is not None and not (isinstance(self.replicas, int) and
                                              self.min_replicas <= self.replicas <= self.max_replicas):
            raise ValueError(f"--replicas must be an int in [--min-replicas, --max-replicas] = [{self.min_replicas}, "
                             f"{self.max_replicas}], got {self.replicas!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"--replica-threads must be an int >= 1, got {self.threads!r}")
        for name, flag in (("target_jobs", "--target-jobs-per-replica"), ("upscale_delay_s", "--upscale-delay"),
                           ("downscale_delay_s", "--downscale-delay"), ("look_back_s", "--look-back"),
                           ("drain_timeout_s", "--drain-timeout")):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value < float("inf")) or (name == "target_jobs" and
                                                                                        value <= 0):
                raise ValueError(f"{flag} must be a number of {'jobs > 0' if name == 'target_jobs' else 'seconds >= 0'}"
                                 f", got {value!r}")
        for name, flag in (("gpus", "--replica-gpus"), ("cpus", "--replica-cpus")):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value < float("inf")):
                raise ValueError(f"{flag} must be a number >= 0, got {value!r}")
        if not self.app_name or not self.app_name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"the application name must be letters, digits, '-' and '_', got {self.app_name!r}")

    @classmethod
    def fixed(cls, replicas: int, **kwargs: object) -> RayOptions:
        """`replicas` replicas, no autoscaling."""
        return cls(replicas=replicas, min_replicas=replicas, max_replicas=replicas, **kwargs)  # type: ignore[arg-type]

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas != self.max_replicas

    @property
    def initial_replicas(self) -> int:
        return self.replicas if self.replicas is not None else max(1, self.min_replicas)

    @property
    def torch_threads(self) -> int:
        return self.threads if self.threads is not None else max(1, int(self.cpus))

    @property
    def hub_name(self) -> str:
        """The job hub actor's name (in `HUB_NAMESPACE`): one per application."""
        return f"{self.app_name}-jobs"
