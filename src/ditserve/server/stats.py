"""A snapshot of the job runner for /health and /metrics (its own module: the runner and the
metrics both read it, and neither imports the other)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RunnerStats"]


@dataclass(frozen=True)
class RunnerStats:
    """queued: jobs waiting to join the batch; running: jobs in it (or having their file written);
    capacity: most jobs accepted and not finished (queued + running); mean_job_s: mean run time
    of recent jobs (None before the first); last_batch_size / last_step_tokens: requests and DiT tokens of the latest batched
    step (0 before the first); max_batch_size / max_batch_tokens: the limits in force (None: no
    size limit / the engine has not started); decoding: jobs done denoising, waiting for or in
    the VAE; paused: jobs admitted but sitting the latest step out (the step policy)."""

    queued: int
    running: int
    capacity: int
    mean_job_s: float | None
    last_batch_size: int = 0
    last_step_tokens: int = 0
    max_batch_size: int | None = None
    max_batch_tokens: int | None = None
    decoding: int = 0
    paused: int = 0
