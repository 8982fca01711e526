"""Jobs: one generation request's life (queued -> in_progress -> completed/failed/cancelled).

A `Job` is written by the engine's and writer's threads (progress, result) and read by the event loop
(status polls), so every change goes through a method that holds the job's lock, and
readers take a `snapshot()`. Terminal states are final: a late cancel cannot turn a
completed job into a cancelled one, nor a late result a cancelled job into a completed one.
Every transition bumps the snapshot's `version` and is reported to the job's change
listeners (the durable store: `ditserve.server.store`), so a slower write of an older
state never overwrites a newer one.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from ditserve.engine import GenerationRequest

__all__ = ["Job", "JobError", "JobKind", "JobSnapshot", "JobStatus", "new_job_id"]

log = logging.getLogger("ditserve.server")

JobKind = Literal["video", "image"]


class JobStatus(str, Enum):
    """Status names as OpenAI's video objects spell them (plus `cancelled`)."""

    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True)
class JobError:
    """Why a job failed or was cancelled: a stable `code` for programs, a `message` for people."""

    code: str
    message: str


@dataclass(frozen=True)
class JobSnapshot:
    """A consistent, immutable view of a job at one instant (what the API serialises)."""

    id: str
    kind: JobKind
    request: GenerationRequest
    fps: float
    status: JobStatus
    created_at: float
    started_at: float | None
    finished_at: float | None
    step: int
    total_steps: int
    error: JobError | None
    timings: dict[str, Any]
    path: Path | None
    owner: str | None = None
    version: int = 0

    @property
    def progress(self) -> int:
        """Percent done: steps finished (capped at 99 until the file is written), 100 when completed."""
        if self.status is JobStatus.COMPLETED:
            return 100
        if not self.total_steps:
            return 0
        return min(99, 100 * self.step // self.total_steps)


def new_job_id(kind: JobKind) -> str:
    """`video_<32 hex>` / `img_<32 hex>`: unguessable, so ids double as capabilities for /content."""
    return f"{'video' if kind == 'video' else 'img'}_{secrets.token_hex(16)}"


@dataclass(eq=False)
class Job:
    """One request to generate; `cancel_event` is what the pipeline checks before every step.

    owner: who may see the job (a hash of the API key that created it; None when the server
    has no keys). An input image travels decoded in `request.image` (never stored on disk).
    """

    kind: JobKind
    request: GenerationRequest
    fps: float
    id: str = ""
    created_at: float = field(default_factory=time.time)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    owner: str | None = None

    def __post_init__(self) -> None:
        self.id = self.id or new_job_id(self.kind)
        self._lock = threading.Lock()
        self._status = JobStatus.QUEUED
        self._started_at: float | None = None
        self._finished_at: float | None = None
        self._step = 0
        self._total_steps = self.request.num_inference_steps
        self._error: JobError | None = None
        self._timings: dict[str, Any] = {}
        self._path: Path | None = None
        self._version = 0
        self._on_finish: list[Callable[[Job], None]] = []
        self._on_change: list[Callable[[JobSnapshot], None]] = []

    @classmethod
    def restored(cls, snap: JobSnapshot) -> Job:
        """A job as a durable store recorded it (after a restart): same id, state and times."""
        job = cls(kind=snap.kind, request=snap.request, fps=snap.fps, id=snap.id, created_at=snap.created_at,
                  owner=snap.owner)
        job._status, job._started_at, job._finished_at = snap.status, snap.started_at, snap.finished_at
        job._step, job._total_steps, job._error = snap.step, snap.total_steps, snap.error
        job._timings, job._path, job._version = dict(snap.timings), snap.path, snap.version
        return job

    # -- reading ---------------------------------------------------------------------------

    @property
    def status(self) -> JobStatus:
        return self._status

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            return self._snapshot_locked()

    def _snapshot_locked(self) -> JobSnapshot:
        return JobSnapshot(
            id=self.id, kind=self.kind, request=self.request, fps=self.fps, status=self._status,
            created_at=self.created_at, started_at=self._started_at, finished_at=self._finished_at,
            step=self._step, total_steps=self._total_steps, error=self._error,
            timings=dict(self._timings), path=self._path, owner=self.owner, version=self._version,
        )

    def on_finish(self, callback: Callable[[Job], None]) -> None:
        """Call `callback(job)` once the job is finished (at once if it already is), from the finishing thread."""
        with self._lock:
            if not self._status.finished:
                self._on_finish.append(callback)
                return
        callback(self)

    def on_change(self, listener: Callable[[JobSnapshot], None]) -> None:
        """Call `listener(snapshot)` after every state transition (not after progress updates), before the
        `on_finish` callbacks, from the thread that made the transition."""
        with self._lock:
            self._on_change.append(listener)

    # -- transitions (engine or writer thread, or the runner for queued jobs) ----------------

    def start(self) -> bool:
        """queued -> in_progress; False if the job was already finished (cancelled while queued)."""
        with self._lock:
            if self._status is not JobStatus.QUEUED:
                return False
            self._status = JobStatus.IN_PROGRESS
            self._started_at = time.time()
            self._version += 1
            snap, listeners = self._snapshot_locked(), list(self._on_change)
        self._notify(listeners, snap)
        return True

    def set_progress(self, step: int, total_steps: int) -> None:
        with self._lock:
            self._step, self._total_steps = step, total_steps

    def complete(self, path: Path, timings: dict[str, Any]) -> None:
        self._finish(JobStatus.COMPLETED, None, timings, path)

    def fail(self, code: str, message: str, timings: dict[str, Any] | None = None) -> None:
        self._finish(JobStatus.FAILED, JobError(code, message), timings or {}, None)

    def mark_cancelled(self, message: str) -> None:
        self._finish(JobStatus.CANCELLED, JobError("cancelled", message), {}, None)

    def _finish(self, status: JobStatus, error: JobError | None, timings: dict[str, Any], path: Path | None) -> None:
        with self._lock:
            if self._status.finished:
                return
            self._status, self._error, self._path = status, error, path
            self._timings = dict(timings)
            self._finished_at = time.time()
            self._version += 1
            callbacks, self._on_finish = self._on_finish, []
            snap, listeners = self._snapshot_locked(), list(self._on_change)
        self._notify(listeners, snap)
        for callback in callbacks:
            try:
                callback(self)
            except Exception:  # a listener's bug must not take a server thread down
                log.exception("job %s: on_finish callback failed", self.id)

    def _notify(self, listeners: list[Callable[[JobSnapshot], None]], snap: JobSnapshot) -> None:
        for listener in listeners:
            try:
                listener(snap)
            except Exception:  # a listener's bug (or a full disk) must not take a server thread down
                log.exception("job %s: on_change listener failed", self.id)
