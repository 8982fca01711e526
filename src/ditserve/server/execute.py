"""How a job ends once its generation is over: frames checked and written atomically, or the reason it failed.

Every way a generation can go wrong ends as that job's state (failed with a reason, or
cancelled), never as an exception out of a server thread: a bad prompt, NaN frames or a
CUDA out-of-memory error fails its job and the server keeps serving the others. A failed
job carries a stable code and a message written for the client (`FAILURES`); the raw
error (allocator text, ffmpeg output, a traceback) goes only to the log, under the job's id.
A job is completed only once its file is checked whole (`ditserve.server.output_check`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ditserve.engine import (
    GenerationCancelled,
    GenerationOutput,
    InvalidRequest,
    RanksLost,
)
from ditserve.server.jobs import Job
from ditserve.server.metrics import Metrics
from ditserve.server.output_check import IncompleteOutput, check_output

__all__ = ["FAILURES", "output_name", "record_failure", "write_output"]

log = logging.getLogger("ditserve.server")

FAILURES = {  # code -> the message a client sees
    "out_of_memory": "the GPU ran out of memory for this request; try a smaller size or fewer frames",
    "generation_failed": "generation failed with an internal error; the server's log has the details under this "
                         "job's id",
    "write_failed": "the output file could not be written whole, so nothing is served; the server's log has the "
                    "details under this job's id",
    "invalid_output": "the model produced NaN or infinite values; nothing was written",
    "rank_failed": "a rank of this server died (its GPUs run every step together), so this job cannot finish; the "
                   "server is stopping: submit the job again once it is back",
}


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
    elif isinstance(error, RanksLost):  # the server's failure, not the job's: no traceback per job
        if not job.status.finished:
            log.info("job %s failed: %s", job.id, error)
        job.fail("rank_failed", FAILURES["rank_failed"])
    else:
        log.error("job %s failed", job.id, exc_info=error)
        code = "out_of_memory" if _is_out_of_memory(error) else "generation_failed"
        if code == "out_of_memory":
            _release_cuda_cache()
        job.fail(code, FAILURES[code])


def write_output(job: Job, output: GenerationOutput, output_dir: Path, metrics: Metrics) -> float | None:
    """Check the frames and write the job's file atomically; complete the job. Its run time, or None
    if it did not complete (cancelled after denoising, NaN frames, a failed write)."""
    if job.status.finished or job.cancel_event.is_set():  # asked to stop after the last step: write nothing
        job.mark_cancelled("cancelled after denoising; nothing was written")
        return None
    if not np.isfinite(np.asarray(output.frames)).all():
        job.fail("invalid_output", FAILURES["invalid_output"], dict(output.timings))
        return None
    saving = time.perf_counter()
    target = output_dir / output_name(job)
    request = job.request
    try:
        path = Path(output.save(target, fps=job.fps))
        check_output(path, num_frames=request.num_frames, width=request.width, height=request.height)
    except (Exception, IncompleteOutput):
        log.exception("job %s: writing its file failed", job.id)
        target.unlink(missing_ok=True)
        job.fail("write_failed", FAILURES["write_failed"], dict(output.timings))
        return None
    started = job.snapshot().started_at or job.created_at
    job_s = time.time() - started
    timings = {**output.timings, "save_s": time.perf_counter() - saving, "job_s": job_s}
    metrics.observe_job(timings)
    job.complete(path, timings)
    log.info("job %s completed in %.2f s", job.id, job_s)
    return job_s
