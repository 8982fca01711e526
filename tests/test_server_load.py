"""Load: 200 clients connected at once, 50 of them submitting, lose and duplicate nothing."""

from __future__ import annotations

import asyncio
import sqlite3
import ssl
import time
from pathlib import Path
from typing import Any

import httpx

from ditserve.server import ServerSettings, create_app
from helpers.server import GatedPipeline, serve_in_thread

CLIENTS, SUBMITTERS = 200, 50
TINY = {"size": "16x16", "num_frames": 1, "steps": 1, "guidance_scale": 1.0}


async def _crowd(url: str, pipe: GatedPipeline) -> tuple[list[httpx.Response], list[httpx.Response]]:
    """Every client opens its own connection; once all 200 are connected, 50 submit a video while 150 read
    (list, health, models); the engine is held until every submission is answered."""
    connected, answered = asyncio.Barrier(CLIENTS), asyncio.Barrier(CLIENTS)
    tls = ssl.create_default_context()  # built once: unused on http://, but each client would build its own

    async def client(i: int) -> tuple[str, httpx.Response, httpx.Response]:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits, verify=tls) as http:
            assert (await http.get("/health")).status_code == 200
            await connected.wait()  # 200 connections open at once
            if i < SUBMITTERS:
                first = await http.post("/v1/videos", json={"prompt": f"job {i}", **TINY, "seed": i})
            else:
                first = await http.get(("/v1/videos", "/health", "/v1/models")[i % 3])
            await answered.wait()
            later = await http.get("/v1/videos?limit=100" if i % 2 else "/metrics")
            return ("submit" if i < SUBMITTERS else "read"), first, later

    async def release() -> None:
        await asyncio.sleep(0)  # let the crowd start
        while len(answers) < SUBMITTERS:
            await asyncio.sleep(0.01)
        pipe.gate.set()

    answers: list[Any] = []

    async def tracked(i: int) -> tuple[str, httpx.Response, httpx.Response]:
        result = await client(i)
        answers.append(result)
        return result

    results, _ = await asyncio.gather(asyncio.gather(*(tracked(i) for i in range(CLIENTS))), release())
    submits = [first for kind, first, _ in results if kind == "submit"]
    others = [r for kind, first, later in results for r in ((first, later) if kind == "read" else (later,))]
    return submits, others


def test_200_connections_and_50_submissions_lose_and_duplicate_nothing(tiny_pipeline: Any, tmp_path: Path) -> None:
    pipe = GatedPipeline(tiny_pipeline, gated=True)
    out = tmp_path / "out"
    app = create_app(pipe, ServerSettings(model_name="tiny-wan", output_dir=out, max_queue=64, keep_jobs=100))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        started = time.monotonic()
        submits, others = asyncio.run(_crowd(url, pipe))
        assert [r.status_code for r in submits] == [200] * SUBMITTERS, [r.text for r in submits if r.is_error]
        assert all(r.status_code == 200 for r in others), {r.status_code for r in others}
        ids = [r.json()["id"] for r in submits]
        assert len(set(ids)) == SUBMITTERS
        deadline = time.monotonic() + 60
        while (done := [http.get(f"/v1/videos/{i}").json()["status"] for i in ids]).count("completed") < SUBMITTERS:
            assert "failed" not in done and time.monotonic() < deadline, done
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        listed = [v["id"] for v in http.get("/v1/videos", params={"limit": 100}).json()["data"]]
    assert sorted(listed) == sorted(ids)  # nothing lost, nothing twice
    assert sorted(pipe.prompts) == sorted(f"job {i}" for i in range(SUBMITTERS))  # each ran exactly once
    assert sorted(p.name for p in out.iterdir() if p.name != ".ditserve") == sorted(f"{i}.mp4" for i in ids)
    with sqlite3.connect(out / ".ditserve" / "jobs.sqlite3") as db:
        rows = db.execute("SELECT id, status FROM jobs").fetchall()
    assert sorted(rows) == sorted((i, "completed") for i in ids)
    assert elapsed < 60
