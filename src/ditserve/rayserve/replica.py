"""A generator replica: one pipeline and its batching engine on the replica's own device, as `ditserve serve` runs them.

The body of the `Generator` Serve deployment (`application.py` wraps it). It reuses the single
server's `JobRunner` unchanged: jobs join the running batch at step boundaries, files are
checked and written atomically into the shared output folder. Serve hands it one `run(order)`
call per job (at most `max_ongoing_requests` at once, its --max-queue); the call returns the
job's final snapshot, which the job hub records. Meanwhile a heartbeat thread reports the running
jobs' progress, the runner's counts and the metric observations to the hub.

With `ranks` of more than one (`--num-gpus N`), the replica's process is rank 0 of N and starts the
others itself (`replica_ranks`): its engine leads every step on all of them, as `ditserve serve
--num-gpus N` does on one host. A rank that dies ends the whole replica (`replica_ranks.end_process`),
which then counts as a replica death: its jobs are re-queued.

Cancellation is Serve's: the hub cancels the call, `run` sees `CancelledError` and asks the engine
to stop the job at its next step (a file it still writes is deleted: nobody owns it). A replica
that Serve stops (scaling down) declines the jobs it has not finished, and the hub sends them
to another replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from ditserve.distributed import ParallelLayout
from ditserve.engine import InvalidRequest
from ditserve.engine.coordination import Leader
from ditserve.pipelines.options import resolve_device
from ditserve.rayserve.messages import Progress, ReplicaReport, RunOrder
from ditserve.rayserve.metrics import RecordingMetrics
from ditserve.rayserve.options import HUB_NAMESPACE
from ditserve.rayserve.replica_ranks import ReplicaRanks, end_process
from ditserve.rayserve.shared_folder import check_marker
from ditserve.server.execute import output_name
from ditserve.server.jobs import Job, JobSnapshot, JobStatus
from ditserve.server.runner import JobRunner, QueueFull, RunnerClosed
from ditserve.server.settings import ServerSettings

__all__ = ["HEARTBEAT_S", "GeneratorReplica"]

log = logging.getLogger("ditserve.rayserve")

HEARTBEAT_S = 1.0
STOPPING = "the replica is stopping"


class GeneratorReplica:
    """model: the pipeline folder (the same path on every node); load: `Pipeline.from_pretrained` options
    (device, dtype, attention_backend, compile); settings: the server's (output folder, batching limits,
    --max-queue per replica); hub_name / token: the job hub and the output folder's marker; threads:
    torch intra-op threads; warm: `warm_up` before the replica reports ready; log_level: ditserve's;
    ranks: (CFG, Ulysses, ring) degrees of the replica's own ranks (`ParallelLayout`; one rank: (1, 1, 1))."""

    def __init__(self, model: str, load: dict[str, Any], settings: ServerSettings, hub_name: str, token: str,
                 threads: int, warm: bool = True, log_level: str = "info",
                 ranks: tuple[int, int, int] = (1, 1, 1)) -> None:
        import ray
        import torch
        from ray import serve

        from ditserve import Pipeline
        from ditserve.server.main import parallel_family, warm_up
        from ditserve.server.output_check import check_writer

        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        torch.set_num_threads(threads)
        if settings.output_dir is None:
            raise ValueError("a generator replica needs the shared output folder (settings.output_dir)")
        self._folder = Path(settings.output_dir)
        self._node = ray.get_runtime_context().get_node_id()
        check_marker(self._folder, token, self._node)
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        layout = ParallelLayout(*ranks)
        self._ranks: ReplicaRanks | None = None
        self._leader: Leader | None = None
        source: Any
        if layout.world > 1:  # this process is rank 0; the others start now and load alongside
            self._ranks = ReplicaRanks(model, load, layout, resolve_device(load.get("device")).type, threads, log_level)
            groups, device = self._ranks.join()
            pipeline = Pipeline.from_pretrained(model, **{**load, **({"device": device} if device is not None else {})})
            source, self._leader = parallel_family(pipeline, groups), Leader(dead_ranks=self._ranks.dead)
            self._leader.on_lost = lambda error: end_process(f"replica {self._replica_id}: {error}")
            warm = False  # a warm-up would run on rank 0 alone: the other ranks would wait
        else:
            source = pipeline = Pipeline.from_pretrained(model, **load)
        check_writer(pipeline)
        if warm:
            log.info("replica %s: warm-up took %.1f s", self._replica_id, warm_up(pipeline))
        self._metrics = RecordingMetrics()
        self._runner = JobRunner(self._folder, self._metrics, settings.max_queue,
                                 max_batch_size=settings.max_batch_size, max_batch_tokens=settings.max_batch_tokens)
        self._runner.start(source, self._leader)
        self._hub = ray.get_actor(hub_name, namespace=HUB_NAMESPACE)
        self._lock = threading.Lock()
        self._live: dict[str, tuple[Job, int]] = {}  # job id -> (job, attempt)
        self._stopping = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="ditserve-heartbeat", daemon=True)
        self._beat.start()
        log.info("replica %s ready on node %s (pid %d, %d torch thread(s), %d rank(s))", self._replica_id, self._node,
                 os.getpid(), threads, layout.world)

    async def run(self, order: RunOrder) -> JobSnapshot:
        """Run one job to its end; its final snapshot (status `queued`, unchanged: declined, run it elsewhere)."""
        snap = order.job
        job = Job(kind=snap.kind, request=snap.request, fps=snap.fps, id=snap.id, created_at=snap.created_at,
                  owner=snap.owner)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        job.on_finish(lambda _: loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None)))
        try:
            self._runner.submit(job)
        except InvalidRequest as e:  # over the step budget (RequestTooLarge): only a loaded model knows it
            job.fail("invalid_request", f"{e.field}: {e}")
            return self._result(job)
        except (RunnerClosed, QueueFull):
            return snap
        with self._lock:
            self._live[job.id] = (job, order.attempt)
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:  # the hub cancelled the call: stop the job, and own no file
            self._runner.cancel(job.id)
            job.on_finish(self._unlink_output)
            raise
        finally:
            with self._lock:
                self._live.pop(job.id, None)
        if self._stopping.is_set() and job.status is JobStatus.CANCELLED:
            return snap  # stopped with the replica, not by anyone's request: declined
        return self._result(job)

    def check_health(self) -> None:
        """Serve's health check: a replica whose heartbeat thread died is replaced."""
        if not self._beat.is_alive():
            raise RuntimeError("the heartbeat thread stopped")

    def __del__(self) -> None:
        """Serve stops the replica (scaling down, shutdown) after its calls drained or timed out: jobs still
        running stop at their next step and are declined."""
        stopping = getattr(self, "_stopping", None)
        if stopping is None or stopping.is_set():
            return
        stopping.set()
        if self._ranks is not None:  # its engine is about to tell them to stop
            self._ranks.stop_watching()
        self._runner.close(STOPPING)
        self._runner.join(10.0)
        if self._ranks is not None:  # the engine told them to stop as it ended
            self._ranks.close()

    # -- inside ----------------------------------------------------------------------------

    def _result(self, job: Job) -> JobSnapshot:
        snap = job.snapshot()
        return replace(snap, timings={**snap.timings, "replica": self._replica_id})

    def _unlink_output(self, job: Job) -> None:
        if job.status is JobStatus.COMPLETED:
            (self._folder / output_name(job)).unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stopping.wait(HEARTBEAT_S):
            try:
                with self._lock:
                    live = list(self._live.values())
                progress = tuple(Progress(job.id, attempt, s.step, s.total_steps) for job, attempt in live
                                 if (s := job.snapshot()).status is JobStatus.IN_PROGRESS)
                self._hub.report.remote(ReplicaReport(self._replica_id, self._node, os.getpid(), self._runner.stats(),
                                                      progress, self._metrics.drain()))
            except Exception:  # the hub restarting: report again next beat
                log.warning("replica %s: heartbeat to the job hub failed", self._replica_id, exc_info=True)
