"""The job store: live jobs in memory (for their progress), every state change in SQLite, and the
output folder kept in step with it.

State lives in the folder's `.ditserve/` (the job database, a lock). `open()` (at server
start) takes the folder's lock, so two servers never share one
`--output-dir`, and recovers what an earlier run left: jobs that were queued or running
when it stopped are marked failed (`server_restarted`), a completed job whose file is gone
is marked failed (`output_missing`), finished jobs are listed and served again, and every
file ditserve names (`video_<hex>.mp4`, `img_<hex>.png` and their hidden temporary files)
that no completed job owns is deleted: a file written just before a crash, before its job
was committed, or a half-written one. Files with other names are left alone.

`keep` bounds the finished jobs: when one finishes (and at start), the oldest beyond `keep`
are deleted, their rows first, then their files (a crash in between leaves only a file that
the next start deletes).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ditserve.server.jobdb import STATE_DIR, JobDatabase
from ditserve.server.jobs import Job, JobError, JobSnapshot, JobStatus

__all__ = ["LOCK_NAME", "FolderInUse", "JobStore", "Recovery", "is_job_file", "is_partial_file"]

log = logging.getLogger("ditserve.server")

LOCK_NAME = "lock"  # in STATE_DIR
_JOB_FILE = re.compile(r"(?:video|img)_[0-9a-f]{32}\.(?:mp4|png)")
_PARTIAL_FILE = re.compile(r"\.(?:video|img)_.+")
RESTARTED = JobError("server_restarted", "the server restarted before this job finished; submit it again")
OUTPUT_MISSING = JobError("output_missing", "this job's output file is no longer in the server's output folder")


class FolderInUse(Exception):
    """Another ditserve server holds this output folder."""


def is_job_file(name: str) -> bool:
    """A finished output as ditserve names it (`<job id>.mp4` / `.png`)."""
    return _JOB_FILE.fullmatch(name) is not None


def is_partial_file(name: str) -> bool:
    """A temporary file `ditserve.output` writes before its atomic rename."""
    return _PARTIAL_FILE.fullmatch(name) is not None


@dataclass(frozen=True)
class Recovery:
    """What `JobStore.open` found: jobs listed again, jobs marked failed, files deleted."""

    restored: int
    interrupted: int
    missing_output: int
    removed_files: tuple[str, ...]


class JobStore:
    """Every job the server knows, by id, oldest first; keeps at most `keep` finished jobs (and their files).

    Queued and running jobs are never pruned.
    """

    def __init__(self, folder: Path, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (finished jobs to keep), got {keep}")
        self.folder = folder
        self.keep = keep
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._db: JobDatabase | None = None
        self._lock_fd: int | None = None

    # -- life ------------------------------------------------------------------------------

    def open(self) -> Recovery:
        """Lock the folder, open its database, and recover the jobs and files an earlier run left.

        Raises `FolderInUse` or `JobDatabaseError`."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock_folder()
        try:
            self._db = JobDatabase(self.folder)
            return self._recover()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the database and release the folder (idempotent)."""
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def remove_partial_files(self) -> list[Path]:
        """Delete half-written outputs (hidden temporary files); the paths deleted."""
        removed = []
        for path in self.folder.iterdir():
            if is_partial_file(path.name):
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    # -- jobs ------------------------------------------------------------------------------

    def add(self, job: Job) -> None:
        """Record a new job (before it is queued: no other thread changes it yet)."""
        with self._lock:
            if job.id in self._jobs:
                raise ValueError(f"duplicate job id {job.id}")
        self._database().insert(job.snapshot())
        job.on_change(self._persist)
        with self._lock:
            self._jobs[job.id] = job
        job.on_finish(lambda _job: self.prune())

    def discard(self, job: Job) -> None:
        """Forget a job that never got admitted (e.g. the queue was full)."""
        with self._lock:
            self._jobs.pop(job.id, None)
        self._database().delete([job.id])

    def remove(self, job: Job) -> bool:
        """Delete a finished job and its file; False if it is not finished (or already gone)."""
        snap = job.snapshot()
        if not snap.status.finished:
            return False
        with self._lock:
            if self._jobs.get(job.id) is not job:
                return False
        self._database().delete([job.id])
        with self._lock:
            self._jobs.pop(job.id, None)
        if snap.path is not None:
            snap.path.unlink(missing_ok=True)
        return True

    def requeue(self, job: Job) -> Job | None:
        """Put an unfinished job back in the queue (the process running it was lost): a new `Job` with the
        same id, request and owner, queued again, one version on, replacing `job` here and in the database.
        None if `job` is finished or no longer the store's (nothing to run again)."""
        snap = job.snapshot()
        if snap.status.finished:
            return None
        fresh = Job.restored(replace(snap, status=JobStatus.QUEUED, started_at=None, step=0, error=None,
                                     version=snap.version + 1))
        with self._lock:
            if self._jobs.get(job.id) is not job:
                return None
            self._jobs[job.id] = fresh
        self._database().update(fresh.snapshot())
        fresh.on_change(self._persist)
        fresh.on_finish(lambda _job: self.prune())
        return fresh

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        """All jobs, oldest first."""
        with self._lock:
            return list(self._jobs.values())

    def counts(self) -> dict[JobStatus, int]:
        counts = dict.fromkeys(JobStatus, 0)
        for job in self.jobs():
            counts[job.status] += 1
        return counts

    def prune(self) -> list[JobSnapshot]:
        """Drop the oldest finished jobs beyond `keep`, rows first, then files; return what was dropped."""
        with self._lock:
            finished = [job.snapshot() for job in self._jobs.values() if job.status.finished]
            finished.sort(key=lambda s: s.finished_at or 0.0)
            dropped = finished[: max(0, len(finished) - self.keep)]
            for snap in dropped:
                del self._jobs[snap.id]
        if not dropped:
            return []
        try:
            self._database().delete(s.id for s in dropped)
        except Exception:  # their rows stay; the next start prunes them (their files are kept until then)
            log.exception("pruning %d job(s) from the job database failed", len(dropped))
            return []
        for snap in dropped:
            if snap.path is not None:
                snap.path.unlink(missing_ok=True)
        return dropped

    # -- inside ----------------------------------------------------------------------------

    def _database(self) -> JobDatabase:
        if self._db is None:
            raise RuntimeError("the job store is not open")
        return self._db

    def _persist(self, snap: JobSnapshot) -> None:
        db = self._db
        if db is not None:
            db.update(snap)

    def _lock_folder(self) -> None:
        (self.folder / STATE_DIR).mkdir(exist_ok=True)
        fd = os.open(self.folder / STATE_DIR / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUse(f"output folder {self.folder} is in use by another ditserve server; give each "
                              "server its own --output-dir") from None
        self._lock_fd = fd

    def _recover(self) -> Recovery:
        db = self._database()
        now = time.time()
        interrupted = missing = 0
        jobs: list[Job] = []
        for snap in db.load():
            job = Job.restored(snap)
            if not snap.status.finished:
                job = Job.restored(_ended(snap, JobStatus.FAILED, RESTARTED, now))
                interrupted += 1
            elif snap.status is JobStatus.COMPLETED and (snap.path is None or not snap.path.is_file()):
                job = Job.restored(_ended(snap, JobStatus.FAILED, OUTPUT_MISSING, now))
                missing += 1
            if job.snapshot().version != snap.version:
                db.update(job.snapshot())
            jobs.append(job)
        with self._lock:
            self._jobs = {job.id: job for job in jobs}
        owned = {s.path.name for s in (j.snapshot() for j in jobs) if s.status is JobStatus.COMPLETED and s.path}
        removed = []
        for path in sorted(self.folder.iterdir()):
            if (is_job_file(path.name) and path.name not in owned) or is_partial_file(path.name):
                path.unlink(missing_ok=True)
                removed.append(path.name)
        self.prune()
        return Recovery(restored=len(jobs), interrupted=interrupted, missing_output=missing,
                        removed_files=tuple(removed))


def _ended(snap: JobSnapshot, status: JobStatus, error: JobError, now: float) -> JobSnapshot:
    """`snap` ended as `status` with `error` at `now`, one version on, without a file."""
    return replace(snap, status=status, error=error, finished_at=now, path=None, version=snap.version + 1)
