"""One server's state: the pipeline (loading or loaded), the job store, the runner, metrics, draining.

Created per app by `create_app`, never at import: two apps in one process (tests) share
nothing. Starting and stopping are explicit (`start` / `stop`, called by the app's lifespan).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Union

from ditserve.engine import RequestSpec
from ditserve.server.errors import ApiError
from ditserve.server.jobs import Job, JobStore
from ditserve.server.metrics import Metrics
from ditserve.server.runner import JobRunner, QueueFull, RunnerClosed
from ditserve.server.settings import ServerSettings

__all__ = ["PipelineSource", "ServerState", "remove_partial_files"]

log = logging.getLogger("ditserve.server")

if TYPE_CHECKING:  # torch is imported only once the model loads
    from ditserve.engine.family import Family

PipelineSource = Union["Family", Callable[[], "Family"]]

SHUTDOWN_REASON = "cancelled: the server is shutting down"


def remove_partial_files(folder: Path) -> list[Path]:
    """Delete the hidden temporary files `ditserve.output` writes before its atomic rename."""
    removed = []
    for pattern in (".video_*", ".img_*"):
        for path in folder.glob(pattern):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class ServerState:
    """Everything the routes share; lives in `app.state.ditserve`."""

    def __init__(self, source: PipelineSource, settings: ServerSettings, spec: RequestSpec,
                 on_load_failure: Callable[[BaseException], None] | None = None) -> None:
        self.settings = settings
        self.spec = spec
        self.metrics = Metrics()
        self.store = JobStore(settings.keep_jobs)
        self.started_at = time.time()
        self.load_error: str | None = None
        self.draining = False
        self._source = source
        self._pipeline: Family | None = None  # set once the runner's engine runs on it
        self._on_load_failure = on_load_failure
        self._runner: JobRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._own_output_dir = settings.output_dir is None
        self.output_dir = settings.output_dir or Path()

    # -- life --------------------------------------------------------------------------------

    def start(self) -> None:
        """Create the output folder and the runner; start the engine on the pipeline (a factory's: once
        it has loaded the model in the background)."""
        self._loop = asyncio.get_running_loop()
        if self._own_output_dir:
            self.output_dir = Path(tempfile.mkdtemp(prefix="ditserve-outputs-"))
        else:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for path in remove_partial_files(self.output_dir):
                log.info("removed a partial file from an earlier run: %s", path)
        self._runner = JobRunner(self.output_dir, self.metrics, self.settings.max_queue,
                                 max_batch_size=self.settings.max_batch_size,
                                 max_batch_tokens=self.settings.max_batch_tokens)
        self.metrics.watch(self._runner.stats, lambda: {s.value: n for s, n in self.store.counts().items()},
                           lambda: self.ready)
        if hasattr(self._source, "prepare"):  # a loaded pipeline
            self._runner.start(self._source)  # type: ignore[arg-type]
            self._pipeline = self._source  # type: ignore[assignment]
        else:
            threading.Thread(target=self._load, name="ditserve-load", daemon=True).start()

    def _load(self) -> None:
        """Load the model (the factory) and start the engine on it; either failing is a failed load."""
        started = time.perf_counter()
        try:
            pipeline = self._source()  # type: ignore[operator]
            self.runner.start(pipeline)
        except BaseException as e:
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("loading the model failed: %s", self.load_error)
            if self._on_load_failure is not None:
                self._on_load_failure(e)
            return
        self._pipeline = pipeline
        log.info("model %s ready in %.1f s", self.settings.model_name, time.perf_counter() - started)

    def begin_shutdown(self) -> None:
        """Take no new jobs (503), cancel queued ones, and ask the running ones to stop at the next step."""
        if not self.draining:
            log.info("shutting down: no new jobs; cancelling queued and running jobs")
        self.draining = True
        if self._runner is not None:
            self._runner.close(SHUTDOWN_REASON)

    def request_shutdown(self) -> None:
        """`begin_shutdown` from a signal handler or another thread: runs it on the event loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.begin_shutdown)

    async def stop(self) -> None:
        """Drain, wait for the engine and the writer, and leave no temporary files behind."""
        self.begin_shutdown()
        if self._runner is not None:
            stopped = await asyncio.to_thread(self._runner.join, self.settings.shutdown_timeout_s)
            if not stopped:
                log.warning("the running jobs did not stop within %.0f s; exiting anyway",
                            self.settings.shutdown_timeout_s)
        if self._own_output_dir:
            shutil.rmtree(self.output_dir, ignore_errors=True)
        elif self.output_dir.is_dir():
            remove_partial_files(self.output_dir)

    # -- for the routes --------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._pipeline is not None and not self.draining

    def pipeline(self) -> Family:
        """The loaded pipeline, or a 503 saying why there is none."""
        if self.draining:
            raise ApiError(503, "the server is shutting down and takes no new jobs", type="server_error",
                           code="shutting_down")
        if self._pipeline is None:
            if self.load_error is not None:
                raise ApiError(503, f"the model failed to load: {self.load_error}", type="server_error",
                               code="model_load_failed")
            raise ApiError(503, "the model is still loading; retry shortly (GET /health says when it is ready)",
                           type="server_error", code="model_loading", headers={"Retry-After": "5"})
        return self._pipeline

    @property
    def runner(self) -> JobRunner:
        if self._runner is None:
            raise RuntimeError("the server has not started")
        return self._runner

    def admit(self, job: Job) -> None:
        """Store and queue a job, or answer 429 (queue full, with Retry-After) / 503 (shutting down)."""
        self.store.add(job)
        try:
            self.runner.submit(job)
        except QueueFull as e:
            self.store.discard(job)
            self.metrics.jobs_rejected.labels("queue_full").inc()
            raise ApiError(429, str(e), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(max(1, round(e.retry_after_s)))}) from None
        except RunnerClosed as e:
            self.store.discard(job)
            self.metrics.jobs_rejected.labels("shutting_down").inc()
            raise ApiError(503, str(e), type="server_error", code="shutting_down") from None
        self.metrics.jobs_submitted.labels(job.kind).inc()
        job.on_finish(lambda j: self.metrics.jobs_finished.labels(j.status.value).inc())
