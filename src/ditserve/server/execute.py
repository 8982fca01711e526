"""Running one job: generate with progress and cancellation, check the frames, write the file atomically.

Every way a generation can go wrong ends as that job's state (failed with a reason, or
cancelled), never as an exception out of the worker: a bad prompt, NaN frames or a CUDA
out-of-memory error fails one job and the server keeps serving the next.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ditserve.engine import GenerationRequest, InvalidRequest
from ditserve.server.jobs import Job
from ditserve.server.metrics import Metrics

if TYPE_CHECKING:  # torch is imported only once a job runs
    from ditserve.pipelines import GenerationOutput
    from ditserve.pipelines.denoise import CancelToken, StepCallback

__all__ = ["JobExecutor", "ServablePipeline", "output_name"]

log = logging.getLogger("ditserve.server")


class ServablePipeline(Protocol):
    """What the server needs from a pipeline (`ditserve.Pipeline` has both).

    `validate` runs at admission, on the event loop, so it must be cheap and never touch the
    device. `run` is the one seam of job execution: "run this validated request, calling
    `callback(step_index, total)` after each step and stopping when `cancel.is_set()`, and
    return the output". A batching engine can stand in for it without changing the server.
    """

    def validate(self, prompt: Any, negative_prompt: Any = ..., height: Any = ..., width: Any = ...,
                 num_frames: Any = ..., num_inference_steps: Any = ..., guidance_scale: Any = ...,
                 seed: Any = ...) -> GenerationRequest: ...

    def run(self, request: GenerationRequest, *, callback: StepCallback | None = None,
            cancel: CancelToken | None = None) -> GenerationOutput: ...


def output_name(job: Job) -> str:
    """`<id>.mp4` for videos, `<id>.png` for images."""
    return f"{job.id}.{'mp4' if job.kind == 'video' else 'png'}"


def _is_out_of_memory(error: BaseException) -> bool:
    return "out of memory" in str(error).lower()


def _release_cuda_cache() -> None:
    """After an OOM, give the failed job's cached blocks back so the next job has room."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class JobExecutor:
    """`executor(job)` runs one job to a finished state; the runner decides which and when."""

    def __init__(self, pipeline: Callable[[], ServablePipeline], output_dir: Path, metrics: Metrics) -> None:
        self._pipeline = pipeline
        self._output_dir = output_dir
        self._metrics = metrics

    def __call__(self, job: Job) -> None:
        from ditserve.pipelines import GenerationCancelled  # imports torch: only once a job runs

        if job.cancel_event.is_set() or not job.start():
            job.mark_cancelled("cancelled before it started")
            return
        self._metrics.observe_queue_wait(time.time() - job.created_at)
        started = time.perf_counter()
        try:
            output = self._pipeline().run(job.request, callback=lambda i, total: job.set_progress(i + 1, total),
                                          cancel=job.cancel_event)
            if job.cancel_event.is_set():  # asked to stop after the last step: write nothing
                job.mark_cancelled("cancelled after denoising; nothing was written")
                return
            if not np.isfinite(np.asarray(output.frames)).all():
                job.fail("invalid_output", "the model produced NaN or infinite values; nothing was written",
                         dict(output.timings))
                return
            saving = time.perf_counter()
            path = output.save(self._output_dir / output_name(job), fps=job.fps)
        except GenerationCancelled as e:
            log.info("job %s: %s", job.id, e)
            job.mark_cancelled(str(e))
            return
        except InvalidRequest as e:  # admission validated already; a pipeline rule we did not know
            job.fail("invalid_request", f"{e.field}: {e}")
            return
        except Exception as e:
            log.exception("job %s failed", job.id)
            if _is_out_of_memory(e):
                _release_cuda_cache()
                job.fail("out_of_memory", f"{type(e).__name__}: {e}")
            else:
                job.fail("generation_failed", f"{type(e).__name__}: {e}")
            return
        done = time.perf_counter()
        timings = {**output.timings, "save_s": done - saving, "job_s": done - started}
        self._metrics.observe_job(timings)
        job.complete(Path(path), timings)
        log.info("job %s completed in %.2f s", job.id, timings["job_s"])
