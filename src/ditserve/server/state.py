"""One server's state: the pipeline (loading or loaded), the job store, the runner, metrics, draining.

Created per app by `create_app`, never at import: two apps in one process (tests) share
nothing. Starting and stopping are explicit (`start` / `stop`, called by the app's lifespan).

On rank 0 of several, a rank that dies ends the server (`ranks_lost`): every request gets 503
(`rank_failed`), jobs not yet generated fail with that code (recorded in the job store), and
`on_ranks_lost` (serve: stop, exit 1) is told, without waiting on the engine, which may be
blocked in a collective with the dead rank.
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

from ditserve.engine import RanksLost, RequestSpec
from ditserve.server.errors import ApiError
from ditserve.server.jobdb import JobDatabaseError
from ditserve.server.jobs import Job, JobSnapshot
from ditserve.server.metrics import Metrics
from ditserve.server.output_check import check_writer
from ditserve.server.runner import JobRunner, QueueFull, RunnerClosed
from ditserve.server.settings import ServerSettings
from ditserve.server.stats import RunnerStats
from ditserve.server.store import FolderInUse, JobStore

__all__ = ["PipelineSource", "ServerState"]

log = logging.getLogger("ditserve.server")

if TYPE_CHECKING:  # torch is imported only once the model loads
    from ditserve.engine.coordination import Leader
    from ditserve.engine.family import Family

PipelineSource = Union["Family", Callable[[], "Family"]]

SHUTDOWN_REASON = "cancelled: the server is shutting down"
# After a rank died, how long `stop` waits for the engine's thread (it may never return from a collective)
LOST_JOIN_S = 5.0


class ServerState:
    """Everything the routes share; lives in `app.state.ditserve`."""

    def __init__(self, source: PipelineSource, settings: ServerSettings, spec: RequestSpec,
                 on_load_failure: Callable[[BaseException], None] | None = None, leader: Leader | None = None,
                 on_ranks_lost: Callable[[RanksLost], None] | None = None) -> None:
        self._leader = leader  # rank 0 of several: its engine leads the others (`engine.coordination`)
        if leader is not None:
            leader.on_lost = self.request_ranks_lost
        self._on_ranks_lost = on_ranks_lost
        self.failure: RanksLost | None = None  # a rank died: this server can generate nothing any more
        self.settings = settings
        self.spec = spec
        self.metrics = Metrics()
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
        self._store: JobStore | None = None
        self._shutdown_deadline: float | None = None  # time.monotonic() by which shutdown must be done

    # -- life --------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the job store (recovering an earlier run's jobs and files) and create the runner; start the
        engine on the pipeline (a factory's: once it has loaded the model in the background).

        Raises `FolderInUse` or `JobDatabaseError` (uvicorn then reports a failed start-up)."""
        self._loop = asyncio.get_running_loop()
        if self._own_output_dir:
            self.output_dir = Path(tempfile.mkdtemp(prefix="ditserve-outputs-"))
        self._store = JobStore(self.output_dir, self.settings.keep_jobs)
        try:
            recovery = self._store.open()
        except (FolderInUse, JobDatabaseError) as e:
            log.error("cannot start: %s", e)  # uvicorn then reports a failed start-up and serve exits 1
            raise
        if recovery.restored or recovery.removed_files:
            log.info("job store %s: %d job(s) from earlier runs (%d interrupted, marked failed; %d without their "
                     "file); %d stray file(s) removed", self.output_dir, recovery.restored, recovery.interrupted,
                     recovery.missing_output, len(recovery.removed_files))
        self._runner = JobRunner(self.output_dir, self.metrics, self.settings.max_queue,
                                 max_batch_size=self.settings.max_batch_size,
                                 max_batch_tokens=self.settings.max_batch_tokens)
        self.metrics.watch(self._runner.stats, lambda: {s.value: n for s, n in self.store.counts().items()},
                           lambda: self.ready)
        if hasattr(self._source, "prepare"):  # a loaded pipeline
            try:
                check_writer(self._source)
            except Exception as e:
                self._failed(e)
                return
            self._runner.start(self._source, self._leader)  # type: ignore[arg-type]
            self._pipeline = self._source  # type: ignore[assignment]
        else:
            threading.Thread(target=self._load, name="ditserve-load", daemon=True).start()

    def _load(self) -> None:
        """Load the model (the factory), check its outputs can be written, and start the engine on it; any of
        these failing is a failed load."""
        started = time.perf_counter()
        try:
            pipeline = self._source()  # type: ignore[operator]
            check_writer(pipeline)
            self.runner.start(pipeline, self._leader)
        except BaseException as e:
            self._failed(e)
            return
        self._pipeline = pipeline
        log.info("model %s ready in %.1f s", self.settings.model_name, time.perf_counter() - started)

    def _failed(self, error: BaseException) -> None:
        """The model cannot serve: /health says why (503), and `on_load_failure` (serve: exit 1) is told."""
        self.load_error = f"{type(error).__name__}: {error}"
        log.error("loading the model failed: %s", self.load_error)
        if self._on_load_failure is not None:
            self._on_load_failure(error)

    def begin_shutdown(self) -> None:
        """Take no new jobs (503), cancel queued ones, and ask the running ones to stop at the next step.

        Starts the `shutdown_timeout_s` clock that `stop` keeps to."""
        if not self.draining:
            if self.failure is None:
                log.info("shutting down: no new jobs; cancelling queued and running jobs")
            self._shutdown_deadline = time.monotonic() + self.settings.shutdown_timeout_s
        self.draining = True
        if self._runner is not None:
            self._runner.close(SHUTDOWN_REASON)

    def ranks_lost(self, error: RanksLost) -> None:
        """A rank died (torchrun's SIGTERM found it, or a collective failed): answer 503 from now on, fail the
        jobs not generated yet, and tell `on_ranks_lost`. Runs on the event loop; once."""
        if self.failure is not None:
            return
        self.failure = error
        log.error("%s: failing the unfinished jobs and stopping (every step needs every rank)", error)
        if self._leader is not None:
            self._leader.abandon(error)
        if self._runner is not None:
            self._runner.abandon(error)
        if self._on_ranks_lost is not None:
            self._on_ranks_lost(error)

    def request_ranks_lost(self, error: RanksLost) -> None:
        """`ranks_lost` from another thread or a signal handler: runs it on the event loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.ranks_lost, error)

    def request_shutdown(self) -> None:
        """`begin_shutdown` from a signal handler or another thread: runs it on the event loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.begin_shutdown)

    async def stop(self) -> None:
        """Drain, wait (until `shutdown_timeout_s` after shutdown began) for the engine and the writer, close
        the job store, and leave no temporary files behind."""
        self.begin_shutdown()
        if self._runner is not None:
            left = max(0.0, (self._shutdown_deadline or time.monotonic()) - time.monotonic())
            if self.failure is not None:
                left = min(left, LOST_JOIN_S)
            stopped = await asyncio.to_thread(self._runner.join, left)
            if not stopped and self.failure is not None:
                log.warning("the engine did not stop within %g s (a collective with the dead rank may never "
                            "return); exiting anyway", left)
            elif not stopped:
                log.warning("the running jobs did not stop within --shutdown-timeout %g s; exiting anyway (they "
                            "will show as failed, server_restarted, after a restart)", self.settings.shutdown_timeout_s)
        if self._store is not None:
            if self.output_dir.is_dir():
                self._store.remove_partial_files()
            self._store.close()
        if self._own_output_dir:
            shutil.rmtree(self.output_dir, ignore_errors=True)

    # -- for the routes --------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._pipeline is not None and not self.draining and self.failure is None

    def pipeline(self) -> Family:
        """The loaded pipeline, or a 503 saying why there is none."""
        if self.failure is not None:
            raise ApiError(503, f"this server lost a rank ({self.failure}): it can generate nothing more and is "
                                "stopping", type="server_error", code="rank_failed")
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
    def store(self) -> JobStore:
        if self._store is None:
            raise RuntimeError("the server has not started")
        return self._store

    @property
    def runner(self) -> JobRunner:
        if self._runner is None:
            raise RuntimeError("the server has not started")
        return self._runner

    # -- what the routes call (awaitable, so a state whose jobs live elsewhere can serve the same routes) --

    async def find(self, job_id: str) -> Job | None:
        return self.store.get(job_id)

    async def jobs(self) -> list[Job]:
        """Every job, oldest first."""
        return self.store.jobs()

    async def cancel(self, job: Job) -> JobSnapshot | None:
        """Cancel a queued job, or ask a running one to stop: its state now; None if it is not running."""
        return job.snapshot() if self.runner.cancel(job.id) else None

    async def remove(self, job: Job) -> bool:
        """Delete a finished job and its file (off the loop: a file system can be slow)."""
        return await asyncio.to_thread(self.store.remove, job)

    async def finished(self, job: Job) -> JobSnapshot:
        """Wait until `job` is finished; its final snapshot."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        job.on_finish(lambda _: loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None)))
        await done
        return job.snapshot()

    def stats(self) -> RunnerStats:
        """The runner's counts now (for /health: never waits on the engine)."""
        return self.runner.stats()

    async def render_metrics(self) -> bytes:
        return self.metrics.render()

    async def admit(self, job: Job) -> None:
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
            if self.failure is not None:
                self.pipeline()  # 503 rank_failed
            raise ApiError(503, str(e), type="server_error", code="shutting_down") from None
        self.metrics.jobs_submitted.labels(job.kind).inc()
        job.on_finish(lambda j: self.metrics.jobs_finished.labels(j.status.value).inc())
