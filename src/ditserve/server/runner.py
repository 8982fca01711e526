"""How admitted jobs get run: a bounded FIFO queue and one worker thread.

The runner decides which job runs and when; what running one job means (generate, check,
write the file) lives in `execute.py`, passed in as a function. The HTTP layer only calls
`submit`, `cancel`, `stats`, `close` and `join`, so a runner that keeps several jobs in
flight for a batching engine can replace this one without touching the routes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ditserve.server.jobs import Job

__all__ = ["JobRunner", "QueueFull", "RunnerClosed", "RunnerStats"]

log = logging.getLogger("ditserve.server")


class QueueFull(Exception):
    """The queue holds `capacity` jobs already; try again after about `retry_after_s` seconds."""

    def __init__(self, capacity: int, retry_after_s: float) -> None:
        super().__init__(f"the job queue is full ({capacity} waiting); retry in about {retry_after_s:.0f} s")
        self.capacity = capacity
        self.retry_after_s = retry_after_s


class RunnerClosed(Exception):
    """The runner is shutting down and takes no new jobs."""


@dataclass(frozen=True)
class RunnerStats:
    """queued: waiting jobs; running: jobs on the device; capacity: most waiting jobs accepted;
    mean_job_s: mean run time of recent jobs (None before the first)."""

    queued: int
    running: int
    capacity: int
    mean_job_s: float | None


class JobRunner:
    """One worker thread running jobs in submission order, with at most `capacity` waiting.

    The routes use only `submit`, `cancel`, `stats`, `close` and `join`.
    """

    def __init__(self, execute: Callable[[Job], None], capacity: int, *, name: str = "ditserve-worker") -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 (queued jobs), got {capacity}")
        self._execute = execute
        self._capacity = capacity
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._closed = False
        self._durations: deque[float] = deque(maxlen=16)
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job and return at once; raises `QueueFull` or `RunnerClosed`."""
        with self._cond:
            if self._closed:
                raise RunnerClosed("the server is shutting down and takes no new jobs")
            if len(self._queue) >= self._capacity:
                raise QueueFull(self._capacity, self._retry_after_locked())
            self._queue.append(job)
            self._cond.notify()

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job now, or ask the running one to stop before its next step; False if neither."""
        with self._cond:
            for job in self._queue:
                if job.id == job_id:
                    self._queue.remove(job)
                    break
            else:
                running = self._running
                if running is not None and running.id == job_id and not running.status.finished:
                    running.cancel_event.set()
                    return True
                return False
        job.cancel_event.set()
        job.mark_cancelled("cancelled while queued")
        return True

    def stats(self) -> RunnerStats:
        with self._cond:
            durations = list(self._durations)
            return RunnerStats(
                queued=len(self._queue),
                running=int(self._running is not None),
                capacity=self._capacity,
                mean_job_s=sum(durations) / len(durations) if durations else None,
            )

    def close(self, reason: str) -> None:
        """Refuse new jobs, cancel every queued job (with `reason`) and ask the running one to stop."""
        with self._cond:
            self._closed = True
            dropped = list(self._queue)
            self._queue.clear()
            if self._running is not None:
                self._running.cancel_event.set()
            self._cond.notify_all()
        for job in dropped:
            job.cancel_event.set()
            job.mark_cancelled(reason)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker to exit after `close`; True if it did within `timeout`."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _retry_after_locked(self) -> float:
        """About how long until a queue slot frees: the running job's expected remaining time."""
        durations = list(self._durations)
        if not durations:
            return 1.0
        mean = sum(durations) / len(durations)
        started = self._running.snapshot().started_at if self._running is not None else None
        remaining = mean - (time.time() - started) if started else mean
        return max(1.0, remaining)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:  # closed and drained
                    return
                job = self._queue.popleft()
                self._running = job
            start = time.perf_counter()
            try:
                self._execute(job)
            except Exception:  # execute handles job errors; this is a bug in it: fail the job, keep serving
                log.exception("job %s: unexpected error in the worker", job.id)
                job.fail("internal_error", "the server hit an internal error running this job; see its log")
            finally:
                with self._cond:
                    self._running = None
                    self._durations.append(time.perf_counter() - start)
