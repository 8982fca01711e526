"""The job table: every job's state in SQLite (`<output dir>/.ditserve/jobs.sqlite3`), so a restart or a
crash loses no job.

One connection, shared by the event loop and the engine's threads behind a lock. WAL mode:
a commit appends to the log, so a write is short and readers never wait for it. Each change
is one statement in its own transaction (atomic). `synchronous=NORMAL` under WAL survives a
killed process (SIGKILL, the OOM killer); only a power cut can lose the latest commits.

A row is written in full from a `JobSnapshot`; an update applies only if its `version` is
newer than the row's, so two threads reporting transitions out of order can never move a
job back (e.g. `in_progress` after `cancelled`). The request is stored as JSON of
`GenerationRequest` and read back tolerant of keys added or removed since it was written.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ditserve.engine import GenerationRequest
from ditserve.server.jobs import JobError, JobSnapshot, JobStatus

__all__ = ["DB_NAME", "STATE_DIR", "JobDatabase", "JobDatabaseError", "request_from_json", "request_to_json"]

STATE_DIR = ".ditserve"  # in the output folder: the database and the folder lock
DB_NAME = "jobs.sqlite3"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    owner TEXT,                             -- hash of the API key that created it; NULL without keys
    request TEXT NOT NULL,                  -- GenerationRequest as JSON
    fps REAL NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    step INTEGER NOT NULL,
    total_steps INTEGER NOT NULL,
    error_code TEXT,
    error_message TEXT,
    timings TEXT NOT NULL,                  -- JSON object
    file TEXT,                              -- name of its output in this folder, once completed
    version INTEGER NOT NULL
)
"""
_COLUMNS = ("id", "kind", "owner", "request", "fps", "status", "created_at", "started_at", "finished_at", "step",
            "total_steps", "error_code", "error_message", "timings", "file", "version")


class JobDatabaseError(Exception):
    """The job database cannot be opened or used (corrupt, written by a newer ditserve, unwritable)."""


def request_to_json(request: GenerationRequest) -> str:
    """ASCII JSON (a lone surrogate in a prompt is escaped, never an encoding error). An input image
    is not stored: a request that had one is not resumed, only shown."""
    data = {f.name: getattr(request, f.name) for f in dataclasses.fields(GenerationRequest) if f.name != "image"}
    data["extras"] = dict(request.extras)
    return json.dumps(data, ensure_ascii=True)


def request_from_json(text: str) -> GenerationRequest:
    """The request a row holds: keys the dataclass no longer has are dropped, missing ones take its defaults."""
    data = json.loads(text)
    known = {f.name for f in dataclasses.fields(GenerationRequest)} - {"image"}
    kept = {k: v for k, v in data.items() if k in known} if isinstance(data, dict) else {}
    kept.setdefault("prompt", "")
    return GenerationRequest(**kept)


def _row(snap: JobSnapshot) -> tuple[Any, ...]:
    return (snap.id, snap.kind, snap.owner, request_to_json(snap.request), snap.fps, snap.status.value,
            snap.created_at, snap.started_at, snap.finished_at, snap.step, snap.total_steps,
            snap.error.code if snap.error else None, snap.error.message if snap.error else None,
            json.dumps(snap.timings, ensure_ascii=True), snap.path.name if snap.path is not None else None,
            snap.version)


class JobDatabase:
    """The `jobs` table of `<folder>/.ditserve/jobs.sqlite3`; job files are named relative to `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / STATE_DIR / DB_NAME
        self.path.parent.mkdir(exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JobDatabaseError(f"{self.path} was written by a newer ditserve (schema {version}, this one "
                                       f"reads {SCHEMA_VERSION}); use that version or another --output-dir")
            self._db.execute(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as e:
            raise JobDatabaseError(f"cannot use the job database {self.path}: {e} (move it away to start with no "
                                   "jobs, or use another --output-dir)") from e

    def insert(self, snap: JobSnapshot) -> None:
        placeholders = ", ".join("?" * len(_COLUMNS))
        with self._lock:
            self._db.execute(f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({placeholders})", _row(snap))

    def update(self, snap: JobSnapshot) -> bool:
        """Write `snap` over its row if it is newer; False if the row is gone or already newer."""
        assignments = ", ".join(f"{c} = ?" for c in _COLUMNS[1:])
        with self._lock:
            cursor = self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ? AND version < ?",
                                      (*_row(snap)[1:], snap.id, snap.version))
        return cursor.rowcount == 1

    def delete(self, ids: Iterable[str]) -> None:
        """Delete the rows of `ids`, all in one transaction."""
        ids = list(ids)
        if not ids:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def load(self) -> list[JobSnapshot]:
        """Every job, oldest first."""
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs ORDER BY seq").fetchall()
        return [self._snapshot(dict(zip(_COLUMNS, row))) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _snapshot(self, row: dict[str, Any]) -> JobSnapshot:
        error = JobError(row["error_code"], row["error_message"] or "") if row["error_code"] else None
        return JobSnapshot(
            id=row["id"], kind=row["kind"], request=request_from_json(row["request"]), fps=row["fps"],
            status=JobStatus(row["status"]), created_at=row["created_at"], started_at=row["started_at"],
            finished_at=row["finished_at"], step=row["step"], total_steps=row["total_steps"], error=error,
            timings=json.loads(row["timings"]), path=self.folder / row["file"] if row["file"] else None,
            owner=row["owner"], version=row["version"],
        )
