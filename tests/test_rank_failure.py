"""A rank that dies is an error, promptly, never a hang: real gloo ranks on the CPU, and the server's side in-process.

`ditserve serve --num-gpus 2` with rank 1 SIGKILLed mid-job: the request waiting on the synchronous
endpoint gets 503 `rank_failed`, the running job ends `failed` with that code in the job store
(not `server_restarted`: it was recorded before the exit), and the launcher exits 1 within seconds
with a line naming the dead rank. `ditserve generate --num-gpus 2` likewise. In-process: what the
server does once it knows a rank died, with a step blocked (as on NCCL, where a collective with a
dead rank never returns).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from helpers.server import (
    GatedPipeline,
    free_port,
    serve_in_thread,
    source_env,
    wait_healthy,
)

from ditserve.engine import RanksLost
from ditserve.server import ServerSettings, create_app
from ditserve.server.execute import FAILURES
from ditserve.server.store import JobStore

EXIT_BOUND_S = 20.0  # from the kill to the launcher's exit (it takes about a second)


def _rank(launcher: subprocess.Popen, rank: int, timeout: float = 60.0) -> psutil.Process:
    """The worker process of `rank` among the launcher's descendants (its environment has RANK)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank):
                    return child
            except psutil.Error:
                continue
        assert launcher.poll() is None, "the launcher exited before its ranks started"
        time.sleep(0.1)
    raise AssertionError(f"rank {rank} never started")


def _wait_exit(proc: subprocess.Popen, since: float) -> float:
    """Seconds from `since` until `proc` exited; fails (and kills its group) past EXIT_BOUND_S."""
    try:
        proc.wait(timeout=max(0.0, since + EXIT_BOUND_S - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"still running {EXIT_BOUND_S:.0f} s after a rank died: a hang") from None
    return time.monotonic() - since


def _stored(folder: Path) -> dict[str, Any]:
    """Every job in the folder's durable store, by id, as a restarted server reads them."""
    store = JobStore(folder, keep=100)
    store.open()
    try:
        return {job.id: job.snapshot() for job in store.jobs()}
    finally:
        store.close()


def test_a_rank_killed_mid_job_fails_the_jobs_with_503_and_ends_the_server(tiny_wan_path: Path,
                                                                            tmp_path: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "server.log"
    port = free_port()
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ditserve", "serve", "--model", str(tiny_wan_path), "--port", str(port),
             "--device", "cpu", "--dtype", "fp32", "--output-dir", str(out), "--num-gpus", "2", "--log-level",
             "warning"], env=source_env(), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            wait_healthy(proc, http, timeout=120)
            video = http.post("/v1/videos", json={"prompt": "a dog", "size": "32x32", "num_frames": 9, "steps": 900,
                                                  "seed": 1}).json()
            image: dict[str, Any] = {}

            def wait_for_image() -> None:
                try:
                    image["response"] = http.post("/v1/images/generations", timeout=60,
                                                  json={"prompt": "a cat", "size": "32x32", "steps": 900})
                except httpx.HTTPError as e:
                    image["error"] = e

            waiter = threading.Thread(target=wait_for_image, daemon=True)
            waiter.start()
            deadline = time.monotonic() + 60
            while True:  # both jobs accepted, the video some steps in: mid-run
                health = http.get("/health").json()
                if health["queued"] + health["running"] == 2 and \
                        http.get(f"/v1/videos/{video['id']}").json()["progress"] >= 1:
                    break
                assert time.monotonic() < deadline, health
                time.sleep(0.1)
            _rank(proc, 1).send_signal(signal.SIGKILL)
            killed = time.monotonic()
            waiter.join(EXIT_BOUND_S)
        assert not waiter.is_alive(), "the synchronous request hung"
        assert "response" in image, f"no answer but {image.get('error')!r}"
        answer = image["response"]
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "rank_failed"
        assert _wait_exit(proc, killed) < EXIT_BOUND_S
        assert proc.returncode == 1
        output = log.read_text()
        assert "ditserve serve: error: rank 1 died (killed by SIGKILL); the other ranks were stopped" in output, \
            output[-3000:]
        assert "rank 1 died: failing the unfinished jobs and stopping" in output, output[-3000:]  # rank 0's log
        jobs = _stored(out)  # as a restarted server lists them: failed with the reason, not lost
        assert len(jobs) == 2 and all(j.status.value == "failed" for j in jobs.values()), jobs
        assert {j.error.code for j in jobs.values()} == {"rank_failed"}
        assert jobs[video["id"]].error.message == FAILURES["rank_failed"]
        assert not [p for p in out.iterdir() if p.name != ".ditserve"]  # nothing written, nothing half-written
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_generate_with_a_rank_killed_exits_1_naming_it(tiny_wan_path: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ditserve", "generate", "--model", str(tiny_wan_path), "--prompt", "a dog",
         "--num-frames", "9", "--steps", "900", "--device", "cpu", "--dtype", "fp32", "--num-gpus", "2",
         "--output", str(tmp_path / "out.mp4")],
        env=source_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(64), "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while not re.search(r"\| *[1-9]\d*/900 ", "".join(err)):  # rank 0's progress bar: steps are running
            assert proc.poll() is None, "".join(err)[-3000:]
            assert time.monotonic() < deadline, "".join(err)[-3000:]
            time.sleep(0.1)
        _rank(proc, 1).send_signal(signal.SIGKILL)
        assert _wait_exit(proc, time.monotonic()) < EXIT_BOUND_S
        reader.join(10)
        assert proc.returncode == 1
        assert "ditserve generate: error: rank 1 died (killed by SIGKILL); the other ranks were stopped" in \
            "".join(err), "".join(err)[-3000:]
        assert not (tmp_path / "out.mp4").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_once_a_rank_is_lost_every_request_gets_503_and_unfinished_jobs_fail(tiny_pipeline: Any,
                                                                           tmp_path: Path) -> None:
    """With the step blocked (a collective that never returns), `ranks_lost` still answers at once: the
    waiting synchronous request, /health and new jobs get 503 `rank_failed`; the running and the queued
    job end failed with it, in the store too; `on_ranks_lost` (serve: stop, exit 1) is told."""
    pipe = GatedPipeline(tiny_pipeline, gated=True)
    told: list[BaseException] = []
    settings = ServerSettings(model_name="tiny-wan", output_dir=tmp_path / "out")
    app = create_app(pipe, settings, on_ranks_lost=told.append)
    state = app.state.ditserve
    small = {"size": "32x32", "num_frames": 5, "steps": 2}
    try:
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
            video = http.post("/v1/videos", json={"prompt": "a dog", **small}).json()
            assert pipe.running.wait(30)  # the video's first step is blocked in the model
            image: dict[str, httpx.Response] = {}
            waiter = threading.Thread(target=lambda: image.update(response=http.post(
                "/v1/images/generations", json={"prompt": "a cat", "size": "32x32", "steps": 2})), daemon=True)
            waiter.start()
            deadline = time.monotonic() + 30
            while http.get("/health").json().get("queued") != 1:  # the image waits behind the blocked step
                assert time.monotonic() < deadline
                time.sleep(0.02)
            error = RanksLost([1])
            state.request_ranks_lost(error)
            waiter.join(10)
            assert image["response"].status_code == 503, image["response"].text
            assert image["response"].json()["error"]["code"] == "rank_failed"
            health = http.get("/health")
            assert health.status_code == 503
            assert health.json() == {"status": "failed", "error": "rank 1 died: the server is stopping",
                                     "code": "rank_failed"}
            refused = http.post("/v1/videos", json={"prompt": "a bird", **small})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "rank_failed"
            failed = http.get(f"/v1/videos/{video['id']}").json()
            assert failed["status"] == "failed"
            assert failed["error"] == {"code": "rank_failed", "message": FAILURES["rank_failed"]}
            assert told == [error]
            pipe.gate.set()  # let the blocked step end, as the process's exit would
    finally:
        pipe.gate.set()
    jobs = _stored(tmp_path / "out")
    assert len(jobs) == 2 and {(j.status.value, j.error.code) for j in jobs.values()} == {("failed", "rank_failed")}


@pytest.mark.parametrize(("exitcode", "said"), [(-9, "rank 1 died (killed by SIGKILL)"),
                                               (1, "rank 1 failed (exit status 1)")])
def test_the_launcher_names_how_the_rank_ended(exitcode: int, said: str) -> None:
    from ditserve.torchrun import describe_failure

    assert describe_failure(1, exitcode, "SIGKILL") == said
