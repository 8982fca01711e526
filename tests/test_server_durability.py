"""Durable jobs: the SQLite job store, and a real `ditserve serve` killed with SIGKILL and restarted."""

from __future__ import annotations

import dataclasses
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from ditserve.engine import GenerationRequest
from ditserve.server.jobdb import JobDatabase, request_from_json, request_to_json
from ditserve.server.jobs import Job, JobStatus
from ditserve.server.store import FolderInUse, JobStore
from helpers.server import free_port, source_env, wait_healthy

SMALL = {"size": "32x32", "num_frames": 5, "steps": 2, "seed": 1}


def _job(prompt: str = "a cat") -> Job:
    return Job(kind="video", request=GenerationRequest(prompt=prompt, height=32, width=32, num_frames=5), fps=16.0)


# -- the store, in process ------------------------------------------------------------------------

def test_every_transition_is_persisted_and_an_older_one_never_wins(tmp_path: Path) -> None:
    store = JobStore(tmp_path, keep=10)
    store.open()
    job = _job("a lone surrogate \ud800 is stored, not an encoding error")
    store.add(job)
    stale = job.snapshot()  # version 0: queued
    assert job.start()
    (tmp_path / f"{job.id}.mp4").write_bytes(b"video")
    job.complete(tmp_path / f"{job.id}.mp4", {"job_s": 1.5})
    db = JobDatabase(tmp_path)
    assert not db.update(stale)  # a late write of an older state is ignored
    [row] = db.load()
    assert (row.status, row.version, row.timings, row.path) == (JobStatus.COMPLETED, 2, {"job_s": 1.5},
                                                                 tmp_path / f"{job.id}.mp4")
    assert row.request == job.request and row.started_at is not None
    db.close()
    store.close()


def test_requests_are_restored_tolerant_of_added_and_removed_fields() -> None:
    request = GenerationRequest(prompt="a cat", height=32, width=48, num_frames=5, seed=7)
    assert request_from_json(request_to_json(request)) == request
    data = {**dataclasses.asdict(request), "a_field_from_the_future": 1}
    del data["guidance_scale"]  # written before the field existed: the default
    restored = request_from_json(json.dumps(data))
    assert restored == dataclasses.replace(request, guidance_scale=GenerationRequest.guidance_scale)


def test_one_output_folder_serves_one_server(tmp_path: Path) -> None:
    first = JobStore(tmp_path, keep=1)
    first.open()
    with pytest.raises(FolderInUse, match="in use by another ditserve server; give each server its own --output-dir"):
        JobStore(tmp_path, keep=1).open()
    first.close()
    second = JobStore(tmp_path, keep=1)
    second.open()  # released on close (and by the kernel if the process dies)
    second.close()


def test_recovery_accounts_for_every_file_and_prunes_across_restarts(tmp_path: Path) -> None:
    store = JobStore(tmp_path, keep=2)
    store.open()
    done = []
    for i in range(2):
        job = _job(f"done {i}")
        store.add(job)
        job.start()
        (tmp_path / f"{job.id}.mp4").write_bytes(b"video")
        job.complete(tmp_path / f"{job.id}.mp4", {})
        done.append(job)
    running, queued, gone = _job("running"), _job("queued"), _job("file deleted by hand")
    for job in (running, queued, gone):
        store.add(job)
    running.start()
    gone.start()
    gone.complete(tmp_path / f"{gone.id}.mp4", {})  # its file never existed
    # a crash: no close; a file written but never committed, a half-written one, and a file not ours
    stray = tmp_path / f"video_{secrets.token_hex(16)}.mp4"
    stray.write_bytes(b"written, never committed")
    (tmp_path / f".{running.id}.mp4.tmp123.mp4").write_bytes(b"half")
    (tmp_path / "notes.txt").write_text("not ditserve's")
    store.close()

    again = JobStore(tmp_path, keep=2)
    recovery = again.open()
    assert (recovery.restored, recovery.interrupted, recovery.missing_output) == (4, 2, 1)  # done 0 was pruned when "gone" finished (keep=2)
    by_id = {j.id: j.snapshot() for j in again.jobs()}
    for job in (running, queued):
        snap = by_id.get(job.id)
        if snap is not None:  # (pruned if older than `keep` finished jobs)
            assert snap.status is JobStatus.FAILED and snap.error.code == "server_restarted"
    # keep=2 across the restart: the two newest finished jobs remain, and only completed jobs' files
    assert len(by_id) == 2
    files = sorted(p.name for p in tmp_path.iterdir() if p.name != ".ditserve")
    assert files == sorted(["notes.txt", *(s.path.name for s in by_id.values() if s.path is not None)])
    assert not stray.exists()
    again.close()


# -- a real server, SIGKILLed and restarted ---------------------------------------------------------

@contextmanager
def running_server(model: Path, out: Path, *extra: str) -> Iterator[tuple[subprocess.Popen[str], httpx.Client]]:
    """`ditserve serve` in a subprocess on a free loopback port, ready; killed after if still running."""
    port = free_port()
    env = source_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ditserve.cli", "serve", "--model", str(model), "--port", str(port),
         "--output-dir", str(out), "--log-level", "warning", "--no-warm-up", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            wait_healthy(proc, http)
            yield proc, http
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def wait_for(http: httpx.Client, job_id: str, statuses: tuple[str, ...] = ("completed", "failed", "cancelled"),
             timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/v1/videos/{job_id}").json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"{job_id} still {job['status']}"
        time.sleep(0.02)


def test_sigkill_and_restart_lose_no_job_and_orphan_no_file(tiny_wan_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with running_server(tiny_wan_path, out, "--max-batch-size", "1", "--keep-jobs", "4") as (proc, http):
        kept = http.post("/v1/videos", json={"prompt": "a short one", **SMALL}).json()["id"]
        assert wait_for(http, kept)["status"] == "completed"
        video = http.get(f"/v1/videos/{kept}/content").content
        long = http.post("/v1/videos", json={"prompt": "a long one", **SMALL, "steps": 1000}).json()["id"]
        queued = http.post("/v1/videos", json={"prompt": "waiting", **SMALL}).json()["id"]
        job = wait_for(http, long, statuses=("in_progress",))
        while job["step"] < 1:
            job = http.get(f"/v1/videos/{long}").json()
        assert http.get(f"/v1/videos/{queued}").json()["status"] == "queued"
        stray = out / f"video_{secrets.token_hex(16)}.mp4"  # as if written just before a crash, never committed
        stray.write_bytes(b"\x00" * 100)
        (out / f".{long}.mp4.abc123.mp4").write_bytes(b"half a video")
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)

    with running_server(tiny_wan_path, out, "--keep-jobs", "4") as (_, http):
        listed = {v["id"]: v for v in http.get("/v1/videos").json()["data"]}
        assert set(listed) == {kept, long, queued}
        assert listed[kept]["status"] == "completed"
        assert http.get(f"/v1/videos/{kept}/content").content == video
        for job_id in (long, queued):
            assert listed[job_id]["status"] == "failed"
            assert listed[job_id]["error"] == {
                "code": "server_restarted",
                "message": "the server restarted before this job finished; submit it again"}
        assert sorted(p.name for p in out.iterdir()) == sorted([".ditserve", f"{kept}.mp4"])

        # --keep-jobs counts the jobs from before the restart: two more finished jobs push out the oldest two
        new = [http.post("/v1/videos", json={"prompt": f"new {i}", **SMALL}).json()["id"] for i in range(2)]
        for job_id in new:
            assert wait_for(http, job_id)["status"] == "completed"
        listed = [v["id"] for v in http.get("/v1/videos").json()["data"]]
        assert len(listed) == 4 and set(new) <= set(listed) and kept not in listed
        assert http.get(f"/v1/videos/{kept}/content").status_code == 404
        assert sorted(p.name for p in out.iterdir()) == sorted([".ditserve", *(f"{i}.mp4" for i in new)])
