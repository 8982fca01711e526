"""The job hub: the one job store every replica shares, and the dispatcher that hands jobs to generator replicas.

It runs as one named, detached Ray actor per application (`launch.start_hub`), on the head node,
and is the single writer of the job database: the same `JobStore` and SQLite file
(`<output dir>/.ditserve/jobs.sqlite3`) as `ditserve serve`, so a job's record, its recovery after a
restart, pruning (`--keep-jobs`) and deletion behave as on one server. Replicas and the ingress
reach it by name; none of them keeps job state of its own.

Dispatch goes through Ray Serve: each accepted job is one call `Generator.run(order)` on a
deployment handle, so Serve's router places it on the replica with the fewest jobs in flight
(power of two choices over queue lengths, at most `max_ongoing_requests` per replica, the rest
queued at the router), and Serve's autoscaler counts those calls as the queued work. The call
returns when the job is finished (the replica wrote its file into the shared output folder).

A replica that dies (its process killed, its node lost, stopped by Serve after failing health
checks) fails the calls it was running with `RayActorError`: the hub puts each such job back in
the queue (`JobStore.requeue`) and dispatches it again, to a live replica, up to `max_attempts`
runs; after that the job fails with code `replica_died`. No job is left without an outcome: every
accepted job is in exactly one dispatch task until it is finished. If the hub itself restarts,
its jobs that were not finished end `failed` (`server_restarted`), as after a server restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ditserve.rayserve.messages import Admission, ClusterView, ReplicaReport, RunOrder
from ditserve.rayserve.metrics import ClusterMetrics, replay
from ditserve.rayserve.shared_folder import write_marker
from ditserve.server.jobs import Job, JobSnapshot, JobStatus
from ditserve.server.stats import RunnerStats
from ditserve.server.store import JobStore

__all__ = ["GENERATOR", "LIVE_S", "REPLICA_DIED", "JobHub"]

log = logging.getLogger("ditserve.rayserve")

GENERATOR = "Generator"  # the generator deployment's name
LIVE_S = 5.0  # a replica not heard from for this long is no longer counted (5 heartbeats: busy cores delay some)
REDISPATCH_PAUSE_S = 0.5  # before sending again a job a replica declined (it was shutting down)
REPLICA_DIED = ("replica_died", ("the replica running this job stopped (its process or node was lost) {n} time(s); "
                                 "submit it again"))


class JobHub:
    """Jobs by id (`JobStore` over the shared output folder) and one dispatch task per unfinished job.

    output_dir: the shared folder (job database and outputs); keep_jobs: finished jobs kept;
    capacity: most jobs accepted and not finished, over all replicas (more get 429);
    max_attempts: runs of a job before a replica death fails it; token: written to the folder
    so that every replica can check that it sees the same folder (`shared_folder`).
    """

    def __init__(self, output_dir: str, keep_jobs: int, capacity: int, max_attempts: int, app_name: str,
                 token: str, deployment: str = GENERATOR, log_level: str = "info") -> None:
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._folder = Path(output_dir)
        self._store = JobStore(self._folder, keep_jobs)
        recovery = self._store.open()
        if recovery.restored or recovery.removed_files:
            log.info("job store %s: %d job(s) from earlier runs (%d interrupted, marked failed); %d stray file(s) "
                     "removed", self._folder, recovery.restored, recovery.interrupted, len(recovery.removed_files))
        write_marker(self._folder, token)
        self._token = token
        self._capacity = capacity
        self._max_attempts = max_attempts
        self._app_name = app_name
        self._deployment = deployment
        self._handle: Any = None
        self._running: dict[str, tuple[int, Any]] = {}  # job id -> (attempt, the Serve response of its run)
        self._cancel_reasons: dict[str, str] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._waiters: dict[str, asyncio.Event] = {}
        self._replicas: dict[str, tuple[float, ReplicaReport]] = {}
        self._closed = False
        self.metrics = ClusterMetrics(self._live_replicas)
        self.metrics.watch(self._stats, lambda: {s.value: n for s, n in self._store.counts().items()},
                           lambda: bool(self._live_replicas()) and not self._closed)
        for job in self._store.jobs():
            self._track(job)

    # -- for the ingress ---------------------------------------------------------------------

    async def submit(self, snap: JobSnapshot) -> Admission:
        """Accept a new job (stored before this returns, so any replica finds it) and dispatch it; or refuse it."""
        if self._closed:
            self.metrics.jobs_rejected.labels("shutting_down").inc()
            return Admission(503, "shutting_down", "the server is shutting down and takes no new jobs")
        counts = self._store.counts()
        if counts[JobStatus.QUEUED] + counts[JobStatus.IN_PROGRESS] >= self._capacity:
            self.metrics.jobs_rejected.labels("queue_full").inc()
            retry = max(1.0, self._stats().mean_job_s or 1.0)
            return Admission(429, "queue_full", f"the server is full ({self._capacity} jobs accepted and not finished "
                                                f"over all replicas, --max-queue x --max-replicas); retry in about "
                                                f"{retry:.0f} s", retry_after_s=retry)
        job = Job.restored(snap)
        self._store.add(job)
        self._track(job)
        self.metrics.jobs_submitted.labels(job.kind).inc()
        self._tasks[job.id] = asyncio.get_running_loop().create_task(self._dispatch(job.id))
        return Admission()

    async def get(self, job_id: str) -> JobSnapshot | None:
        job = self._store.get(job_id)
        return job.snapshot() if job is not None else None

    async def list(self) -> list[JobSnapshot]:
        """Every job, oldest first."""
        return [job.snapshot() for job in self._store.jobs()]

    async def cancel(self, job_id: str) -> JobSnapshot | None:
        """Cancel a queued job now, or ask its replica to stop a running one (it stops at its next step):
        the job's state now; None if it is finished or unknown."""
        job = self._store.get(job_id)
        if job is None or job.status.finished:
            return None
        if job.status is JobStatus.QUEUED:
            job.mark_cancelled("cancelled while queued")
        self._cancel_run(job_id, "cancelled while running")
        return job.snapshot()

    async def remove(self, job_id: str) -> bool:
        """Delete a finished job and its file; False if it is not finished (or already gone)."""
        job = self._store.get(job_id)
        return job is not None and await asyncio.to_thread(self._store.remove, job)

    async def wait(self, job_id: str) -> JobSnapshot | None:
        """Wait until the job is finished: its final snapshot (None if it was deleted meanwhile)."""
        while True:
            job = self._store.get(job_id)
            if job is None or job.status.finished:
                return job.snapshot() if job is not None else None
            event = self._waiters.setdefault(job_id, asyncio.Event())
            await event.wait()

    async def view(self) -> ClusterView:
        return ClusterView(self._stats(), self._live_replicas())

    async def render_metrics(self) -> bytes:
        return self.metrics.render()

    # -- for the replicas --------------------------------------------------------------------

    async def report(self, report: ReplicaReport) -> None:
        """A replica's heartbeat: it is alive; its running jobs' progress; its metric observations."""
        replay(self.metrics, report.observations)
        self._replicas[report.replica_id] = (time.monotonic(), replace(report, observations=()))
        for progress in report.progress:
            running = self._running.get(progress.job_id)
            job = self._store.get(progress.job_id)
            if running is None or running[0] != progress.attempt or job is None or job.status.finished:
                continue  # a late report of an earlier run
            if job.status is JobStatus.QUEUED:
                job.start()
            job.set_progress(progress.step, progress.total)

    # -- life ----------------------------------------------------------------------------------

    async def close(self, reason: str, timeout_s: float) -> int:
        """Take no new jobs, cancel the queued ones and stop the running ones (at their next step); wait up to
        `timeout_s` for every dispatch to end. Returns the jobs still unfinished (0 after a clean stop)."""
        self._closed = True
        for job in self._store.jobs():
            if job.status is JobStatus.QUEUED:
                job.mark_cancelled(reason)
            if not job.status.finished:
                self._cancel_run(job.id, reason)
        tasks = [t for t in self._tasks.values() if not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        return sum(1 for job in self._store.jobs() if not job.status.finished)

    async def shutdown(self) -> None:
        """Close the job database and release the folder (after `close`)."""
        for task in self._tasks.values():
            task.cancel()
        self._store.remove_partial_files()
        self._store.close()

    async def token(self) -> str:
        """The output folder's marker token (replicas check they see it)."""
        return self._token

    # -- dispatch ----------------------------------------------------------------------------

    async def _dispatch(self, job_id: str) -> None:
        """Run one job to its end on some replica, again after a replica died under it (up to max_attempts)."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import ReplicaUnavailableError, RequestCancelledError

        attempt = lost = 0
        try:
            while (job := self._store.get(job_id)) is not None and not job.status.finished:
                attempt += 1
                response = self._generator().run.remote(RunOrder(job.snapshot(), attempt))
                self._running[job_id] = (attempt, response)
                try:
                    result: JobSnapshot = await response
                except RequestCancelledError:
                    job.mark_cancelled(self._cancel_reasons.get(job_id, "cancelled"))
                    return
                except (RayActorError, ReplicaUnavailableError) as e:
                    lost += 1
                    self.metrics.replicas_lost.inc()
                    job = self._store.get(job_id)
                    if job is None or job.status.finished:
                        return
                    if attempt < self._max_attempts:
                        log.warning("job %s: its replica died (run %d: %s); queued again", job_id, attempt,
                                    type(e).__name__)
                        fresh = self._store.requeue(job)
                        if fresh is not None:
                            self._track(fresh)
                            self.metrics.jobs_requeued.labels("replica_died").inc()
                        continue
                    log.error("job %s: its replica died on run %d of %d; failed", job_id, attempt, self._max_attempts)
                    job.fail(REPLICA_DIED[0], REPLICA_DIED[1].format(n=lost))
                    return
                finally:
                    self._running.pop(job_id, None)
                if result.status is JobStatus.QUEUED:  # the replica was shutting down and took nothing
                    attempt -= 1
                    await asyncio.sleep(REDISPATCH_PAUSE_S)
                    continue
                self._apply(job_id, result)
                return
        except Exception as e:  # Serve could not take the call at all (e.g. the application was deleted)
            log.exception("job %s: could not be dispatched", job_id)
            job = self._store.get(job_id)
            if job is not None:
                job.fail("generation_failed", f"no replica could take this job ({type(e).__name__}); the server's log "
                                              "has the details under this job's id")
        finally:
            self._tasks.pop(job_id, None)
            self._cancel_reasons.pop(job_id, None)

    def _apply(self, job_id: str, result: JobSnapshot) -> None:
        """A replica's final word on a run: the job ends as it says, unless it already ended here (cancelled or
        deleted meanwhile), in which case the file the run wrote belongs to nobody and is deleted."""
        job = self._store.get(job_id)
        path = self._folder / result.path.name if result.path is not None else None
        if job is None or job.status.finished:
            if path is not None and (job is None or job.snapshot().path != path):
                path.unlink(missing_ok=True)
            return
        if job.status is JobStatus.QUEUED:
            job.start()
        job.set_progress(result.step, result.total_steps)
        timings = dict(result.timings)
        if result.status is JobStatus.COMPLETED and path is not None:
            if path.is_file():
                job.complete(path, timings)
            else:
                job.fail("output_missing", "the replica wrote this job's file where the server cannot see it: "
                                           "--output-dir must be one folder shared by every node", timings)
        elif result.status is JobStatus.CANCELLED:
            job.mark_cancelled(result.error.message if result.error else "cancelled")
        elif result.error is not None:
            job.fail(result.error.code, result.error.message, timings)
        else:
            job.fail("generation_failed", f"the replica ended this job as {result.status.value} without a reason")

    def _cancel_run(self, job_id: str, reason: str) -> None:
        running = self._running.get(job_id)
        if running is not None:
            self._cancel_reasons[job_id] = reason
            running[1].cancel()  # Serve: never sent, or `run` is cancelled on its replica (which stops the job)

    def _generator(self) -> Any:
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_deployment_handle(self._deployment, self._app_name, _check_exists=False)
        return self._handle

    # -- bookkeeping ---------------------------------------------------------------------------

    def _track(self, job: Job | None) -> None:
        """Count the job's end and wake whoever waits for it (once per Job object: a re-queued job is a new one)."""
        if job is not None:
            job.on_finish(self._finished)

    def _finished(self, job: Job) -> None:
        self.metrics.jobs_finished.labels(job.status.value).inc()
        event = self._waiters.pop(job.id, None)
        if event is not None:
            event.set()

    def _live_replicas(self) -> dict[str, ReplicaReport]:
        now = time.monotonic()
        for replica_id in [r for r, (seen, _) in self._replicas.items() if now - seen > LIVE_S]:
            del self._replicas[replica_id]
        return {r: report for r, (_, report) in self._replicas.items()}

    def _stats(self) -> RunnerStats:
        """The runner counts of one server, over every replica (the job counts from the store)."""
        counts = self._store.counts()
        reports = [r.stats for r in self._live_replicas().values()]
        means = [s.mean_job_s for s in reports if s.mean_job_s is not None]
        budgets = [s.max_batch_tokens for s in reports if s.max_batch_tokens is not None]
        return RunnerStats(
            queued=counts[JobStatus.QUEUED], running=counts[JobStatus.IN_PROGRESS], capacity=self._capacity,
            mean_job_s=sum(means) / len(means) if means else None,
            last_batch_size=sum(s.last_batch_size for s in reports),
            last_step_tokens=sum(s.last_step_tokens for s in reports),
            max_batch_size=reports[0].max_batch_size if reports else None,
            max_batch_tokens=min(budgets) if budgets else None,
            decoding=sum(s.decoding for s in reports), paused=sum(s.paused for s in reports))
