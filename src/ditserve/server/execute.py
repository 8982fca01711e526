"""How a job ends once its generation is over: frames checked and written atomically, or the reason it failed.

Every way a generation can go wrong ends as that job's state (failed with a reason, or
cancelled), never as an exception out of a server thread: a bad prompt, NaN frames or a
CUDA out-of-memory error fails its job and the server keeps serving the others.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ditserve.engine import GenerationCancelled, GenerationOutput, InvalidRequest
from ditserve.server.jobs import Job
from ditserve.server.metrics import Metrics

__all__ = ["output_name", "record_failure", "write_output"]

log = logging.getLogger("ditserve.server")


def output_name(job: Job) -> str:
    """`<id>.mp4` for videos, `<id>.png` for images."""
    return f"{job.id}.{'mp4' if job.kind == 'video' else 'png'}"


def _is_out_of_memory(error: BaseException) -> bool:
    return "out of memory" in str(error).lower()


def _release_cuda_cache() -> None:
    """After an OOM, give the failed step's cached blocks back so the next one has room."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def record_failure(job: Job, error: BaseException) -> None:
    """End `job` with the error its generation raised: cancelled, or failed with a code and reason."""
    if isinstance(error, GenerationCancelled):
        log.info("job %s: %s", job.id, error)
        job.mark_cancelled(str(error))
    elif isinstance(error, InvalidRequest):  # admission validated already; a pipeline rule we did not know
        job.fail("invalid_request", f"{error.field}: {error}")
    else:
        log.error("job %s failed", job.id, exc_info=error)
        if _is_out_of_memory(error):
            _release_cuda_cache()
            job.fail("out_of_memory", f"{type(error).__name__}: {error}")
        else:
            job.fail("generation_failed", f"{type(error).__name__}: {error}")


def write_output(job: Job, output: GenerationOutput, output_dir: Path, metrics: Metrics) -> float | None:
    """Check the frames and write the job's file atomically; complete the job. Its run time, or None
    if it did not complete (cancelled after denoising, NaN frames, a failed write)."""
    if job.status.finished or job.cancel_event.is_set():  # asked to stop after the last step: write nothing
        job.mark_cancelled("cancelled after denoising; nothing was written")
        return None
    if not np.isfinite(np.asarray(output.frames)).all():
        job.fail("invalid_output", "the model produced NaN or infinite values; nothing was written",
                 dict(output.timings))
        return None
    saving = time.perf_counter()
    try:
        path = output.save(output_dir / output_name(job), fps=job.fps)
    except Exception as e:
        log.exception("job %s: writing its file failed", job.id)
        job.fail("write_failed", f"{type(e).__name__}: {e}")
        return None
    started = job.snapshot().started_at or job.created_at
    job_s = time.time() - started
    timings = {**output.timings, "save_s": time.perf_counter() - saving, "job_s": job_s}
    metrics.observe_job(timings)
    job.complete(Path(path), timings)
    log.info("job %s completed in %.2f s", job.id, job_s)
    return job_s
