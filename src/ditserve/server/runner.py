"""How admitted jobs run: together, through the continuous-batching engine, at most `capacity` at a time.

`ditserve.engine.batching.BatchingEngine` schedules: jobs are admitted at step boundaries in
arrival order (up to `max_batch_size` at once); each step is one packed DiT forward over the
admitted jobs the step policy picks (least remaining work first, filled up within the token
budget, none passed over for long: `ditserve.engine.policy`); a job that did its last step is
decoded on the engine's decoder thread, beside the next steps. `max_batch_size=1` runs one
job at a time. Around the engine this module keeps what the server promises:

- a bound: at most `capacity` jobs accepted and not finished (waiting, in the batch, or having
  their file written); one more gets `QueueFull` (429) with an estimate of when one can join. A
  job whose tokens per step exceed the step budget is refused (`RequestTooLarge`, 400);
- job states: a job is `in_progress` from the moment the engine admits it (its text encoding
  starts), with step i of n from the engine's per-request callback;
- cancel: a waiting job's future is cancelled at once (it never reaches the model); a running
  one stops at the next step boundary;
- outputs: finished frames are checked and written atomically on writer threads (`WRITERS` at once), so encoding
  an MP4 never holds up the batch.

The HTTP layer only calls `submit`, `cancel`, `stats`, `close` and `join`; the server state calls
`abandon` when a rank of a multi-rank engine died.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

from ditserve.engine import EngineClosed, GenerationOutput, InvalidRequest, RanksLost
from ditserve.server.execute import record_failure, write_output
from ditserve.server.jobs import Job, JobStatus
from ditserve.server.metrics import Metrics
from ditserve.server.stats import RunnerStats

if TYPE_CHECKING:  # torch is imported only once the model loads
    from ditserve.engine.batching import BatchingEngine
    from ditserve.engine.coordination import Leader
    from ditserve.engine.family import Family

__all__ = ["JobRunner", "QueueFull", "RequestTooLarge", "RunnerClosed"]

log = logging.getLogger("ditserve.server")

# Files written at once. The requests of one packed step finish together; with one writer, each image's
# PNG encode (or video's MP4 encode and check) waited for all before it, a tail after the batch's last step.
WRITERS = 4


class QueueFull(Exception):
    """`capacity` jobs are accepted and not finished; try again after about `retry_after_s` seconds."""

    def __init__(self, capacity: int, retry_after_s: float) -> None:
        super().__init__(f"the server is full ({capacity} jobs accepted and not finished, --max-queue); "
                         f"retry in about {retry_after_s:.0f} s")
        self.capacity = capacity
        self.retry_after_s = retry_after_s


class RequestTooLarge(InvalidRequest):
    """The request needs more tokens per step than one step may hold (`--max-batch-tokens`): it could
    only run alone, for a long time, and would likely run out of memory; refused up front (400)."""

    def __init__(self, tokens: int, budget: int) -> None:
        super().__init__("size", f"this request needs {tokens} tokens per denoising step (size x frames, twice with "
                                 f"guidance > 1); one step holds at most {budget} (--max-batch-tokens, from the "
                                 "device's free memory): ask for a smaller size or fewer frames")
        self.tokens = tokens
        self.budget = budget


class RunnerClosed(Exception):
    """The runner is shutting down and takes no new jobs."""


class JobRunner:
    """Runs submitted jobs through one `BatchingEngine` (started by `start(pipeline)` once the model
    is loaded), at most `capacity` waiting. The routes use only `submit`, `cancel`, `stats`,
    `close` and `join`."""

    def __init__(self, output_dir: Path, metrics: Metrics, capacity: int, *, max_batch_size: int | None = None,
                 max_batch_tokens: int | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 (unfinished jobs), got {capacity}")
        self._output_dir = output_dir
        self._metrics = metrics
        self._capacity = capacity
        self._max_batch_size = max_batch_size
        self._max_batch_tokens = max_batch_tokens
        self._lock = threading.Lock()  # never held while a job finishes (its callbacks take it)
        self._jobs: dict[str, tuple[Job, Future[GenerationOutput]]] = {}  # submitted, not finished
        self._closed = False
        self._durations: deque[float] = deque(maxlen=16)
        self._engine: BatchingEngine | None = None
        self._outputs: queue.SimpleQueue[tuple[Job, GenerationOutput] | None] = queue.SimpleQueue()
        self._writers = [threading.Thread(target=self._write_outputs, name=f"ditserve-writer-{i}", daemon=True)
                         for i in range(WRITERS)]

    def start(self, pipeline: Family, leader: Leader | None = None) -> None:
        """Build the engine over the loaded pipeline (its default budget needs the model in memory) and start it.

        Raises what the engine raises for limits it cannot use.
        """
        from ditserve.engine.batching import BatchingEngine

        engine = BatchingEngine(pipeline, leader=leader, max_batch_size=self._max_batch_size,
                                max_batch_tokens=self._max_batch_tokens, on_step=self._metrics.observe_step)
        with self._lock:
            if self._engine is not None:
                raise RuntimeError("the runner was already started")
            if self._closed:
                return
            self._engine = engine
        for writer in self._writers:
            writer.start()
        engine.start()
        log.info("batching: at most %s jobs and %d tokens per step", self._max_batch_size or "any number of",
                 engine.max_batch_tokens)

    # -- for the routes --------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job and return at once; raises `RequestTooLarge`, `QueueFull` or `RunnerClosed`."""
        with self._lock:
            if self._closed or self._engine is None:
                raise RunnerClosed("the server is shutting down and takes no new jobs" if self._closed
                                   else "the model is not loaded yet")
            tokens = self._engine.tokens_of(job.request)
            if tokens > self._engine.max_batch_tokens:
                raise RequestTooLarge(tokens, self._engine.max_batch_tokens)
            if len(self._jobs) >= self._capacity:
                raise QueueFull(self._capacity, self._retry_after_locked())
            try:
                future = self._engine.submit(job.request, cancel=job.cancel_event,
                                             callback=lambda i, total: job.set_progress(i + 1, total),
                                             on_start=lambda: self._admitted(job))
            except EngineClosed:  # it closed itself: its ranks were lost, and the state will know in a moment
                raise RunnerClosed("the server is stopping and takes no new jobs") from None
            self._jobs[job.id] = (job, future)
        job.on_finish(self._forget)
        future.add_done_callback(lambda f: self._generated(job, f))

    def cancel(self, job_id: str) -> bool:
        """Cancel a waiting job now, or ask a running one to stop at the next step; False if neither."""
        with self._lock:
            entry = self._jobs.get(job_id)
        if entry is None:
            return False
        job, future = entry
        if future.cancel():  # not admitted yet: it never reaches the model (`_generated` marks it)
            return True
        if job.status.finished:
            return False
        job.cancel_event.set()
        return True

    def stats(self) -> RunnerStats:
        with self._lock:
            queued = self._queued_locked()
            running = len(self._jobs) - queued
            durations = list(self._durations)
            engine = self._engine
        engine_stats = engine.stats() if engine is not None else None
        last = engine_stats.last_step if engine_stats is not None else None
        return RunnerStats(
            queued=queued,
            running=running,
            capacity=self._capacity,
            mean_job_s=sum(durations) / len(durations) if durations else None,
            last_batch_size=last.requests if last is not None else 0,
            last_step_tokens=last.tokens if last is not None else 0,
            max_batch_size=self._max_batch_size,
            max_batch_tokens=engine.max_batch_tokens if engine is not None else self._max_batch_tokens,
            decoding=engine_stats.decoding if engine_stats is not None else 0,
            paused=last.paused if last is not None else 0,
        )

    def close(self, reason: str) -> None:
        """Refuse new jobs, cancel every waiting job (with `reason`) and ask the running ones to stop."""

        def cancel_waiting(job: Job, future: Future) -> None:
            if job.status is JobStatus.QUEUED:
                job.mark_cancelled(reason)
                future.cancel()

        self._end_unfinished(cancel_waiting)

    def abandon(self, error: RanksLost) -> None:
        """A rank died: refuse new jobs and fail every job not generated yet with `error`, now. The engine may
        be blocked in a collective with the dead rank that never returns (NCCL), so nothing here waits on it;
        a job already generated still has its file written."""

        def fail(job: Job, future: Future) -> None:
            record_failure(job, error)  # before cancelling the future: a finished job stays as it is
            future.cancel()

        self._end_unfinished(fail)

    def _end_unfinished(self, settle: Callable[[Job, Future], None]) -> None:
        """Refuse new jobs; ask each job not generated yet to stop and `settle` its record; close the engine
        without waiting for it (a generated job still has its file written)."""
        with self._lock:
            self._closed = True
            entries = list(self._jobs.values())
            engine = self._engine
        for job, future in entries:
            if future.done():
                continue  # generated: its file is being written
            job.cancel_event.set()
            settle(job, future)
        if engine is not None:
            engine.close(cancel=True)

    def join(self, timeout: float | None = None) -> bool:
        """Wait, after `close`, for the engine to stop and every generated file to be written; True if
        both happened within `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        engine = self._engine
        if engine is not None and not engine.stop(cancel=True, timeout=timeout):
            return False
        alive = [writer for writer in self._writers if writer.is_alive()]
        for _ in alive:  # after the engine's last output: the writers drain the queue, and each exits at a None
            self._outputs.put(None)
        for writer in alive:
            writer.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(writer.is_alive() for writer in self._writers)

    # -- engine and writer threads ----------------------------------------------------------

    def _admitted(self, job: Job) -> None:
        """The engine admitted `job` into the batch (stepping thread)."""
        if job.start():
            self._metrics.observe_queue_wait(time.time() - job.created_at)

    def _generated(self, job: Job, future: Future[GenerationOutput]) -> None:
        """The engine resolved a job's future (stepping thread, or the thread that cancelled it)."""
        if future.cancelled():
            job.mark_cancelled("cancelled while queued")
            return
        error = future.exception()
        if error is not None:
            record_failure(job, error)
        else:
            self._outputs.put((job, future.result()))

    def _write_outputs(self) -> None:
        while (item := self._outputs.get()) is not None:
            job, output = item
            try:
                job_s = write_output(job, output, self._output_dir, self._metrics)
            except Exception:  # a bug in writing: fail the job, keep serving
                log.exception("job %s: unexpected error writing its output", job.id)
                job.fail("internal_error", "the server hit an internal error writing this job; see its log")
                continue
            if job_s is not None:
                with self._lock:
                    self._durations.append(job_s)

    def _forget(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(job.id, None)

    def _queued_locked(self) -> int:
        return sum(1 for job, _ in self._jobs.values() if job.status is JobStatus.QUEUED)

    def _retry_after_locked(self) -> float:
        """About how long until a waiting job can join: the mean job time less the oldest running job's age."""
        durations = list(self._durations)
        if not durations:
            return 1.0
        started = [job.snapshot().started_at for job, _ in self._jobs.values()]
        elapsed = time.time() - min((s for s in started if s is not None), default=time.time())
        return max(1.0, sum(durations) / len(durations) - elapsed)
