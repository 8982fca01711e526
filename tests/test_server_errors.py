"""No 500 for a client's mistake, clean 500s for our own, and no job `completed` without its whole file."""

from __future__ import annotations

import dataclasses

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest

from ditserve.server import ServerSettings, create_app
from ditserve.server.execute import FAILURES
from ditserve.server.output_check import OutputWriterMissing, check_writer
from helpers.server import GatedPipeline, free_port, serve_in_thread, source_env

SRC = Path(__file__).resolve().parents[1] / "src"
SMALL = {"size": "32x32", "num_frames": 5, "steps": 1, "seed": 1}


def settings(tmp_path: Path, **overrides: Any) -> ServerSettings:
    return ServerSettings(**{"model_name": "tiny-wan", "output_dir": tmp_path / "out", **overrides})


def outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != ".ditserve")


def wait_for(http: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while (job := http.get(f"/v1/videos/{job_id}").json())["status"] not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return job


def test_an_unexpected_error_is_a_clean_500_that_closes_the_connection(tiny_pipeline: Any, tmp_path: Path) -> None:
    app = create_app(tiny_pipeline, settings(tmp_path))

    async def broken() -> None:
        raise KeyError("internal detail that must not reach the client")

    app.add_api_route("/v1/broken", broken)
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        response = http.get("/v1/broken")
        assert response.status_code == 500 and response.headers["connection"] == "close"
        assert response.json() == {"error": {
            "message": "the server hit an internal error answering this request; it is in the server's log",
            "type": "server_error", "param": None, "code": "internal_error"}}
        assert http.get("/health").status_code == 200  # a new connection; the server goes on


def test_a_prompt_that_utf8_cannot_encode_never_breaks_responses(tiny_pipeline: Any, tmp_path: Path) -> None:
    with serve_in_thread(create_app(tiny_pipeline, settings(tmp_path))) as url, httpx.Client(base_url=url) as http:
        body = json.dumps({"prompt": "a lone surrogate \ud800", **SMALL})  # ASCII: the escape as a client sends it
        made = http.post("/v1/videos", content=body, headers={"content-type": "application/json"})
        assert made.status_code in (200, 400), made.text  # refused by the request rules, or stored and shown
        for _ in range(2):
            listed = http.get("/v1/videos")
            assert listed.status_code == 200
            if made.status_code == 200:
                assert listed.json()["data"][0]["prompt"] == "a lone surrogate \ud800"
        if made.status_code == 200:
            wait_for(http, made.json()["id"])


def test_a_file_that_is_not_what_was_asked_fails_its_job(tiny_pipeline: Any, tmp_path: Path) -> None:
    def two_frames(call: int, frames: np.ndarray) -> np.ndarray:
        return frames[:2] if call == 1 else frames  # the writer writes 2 of the 5 frames asked for

    pipe = GatedPipeline(tiny_pipeline, output_hook=two_frames)
    with serve_in_thread(create_app(pipe, settings(tmp_path))) as url, httpx.Client(base_url=url) as http:
        short, whole = (http.post("/v1/videos", json={"prompt": "a cat", **SMALL, "seed": seed}).json()["id"]
                        for seed in (1, 2))
        failed = wait_for(http, short)
        assert failed["status"] == "failed" and failed["error"] == {"code": "write_failed",
                                                                    "message": FAILURES["write_failed"]}
        assert wait_for(http, whole)["status"] == "completed"
        assert http.get(f"/v1/videos/{short}/content").status_code == 409
        assert outputs(tmp_path / "out") == [f"{whole}.mp4"]


@pytest.mark.parametrize("fps", [1e-5, 1e-300, 1e300])
def test_a_frame_rate_the_writer_refuses_never_completes(tiny_pipeline: Any, tmp_path: Path, fps: float) -> None:
    with serve_in_thread(create_app(tiny_pipeline, settings(tmp_path))) as url, httpx.Client(base_url=url) as http:
        made = http.post("/v1/videos", json={"prompt": "a cat", **SMALL, "fps": fps})
        if made.status_code == 400:  # refused up front by the request rules
            assert made.json()["error"]["param"] == "fps"
            return
        job = wait_for(http, made.json()["id"])
        if job["status"] == "completed":  # then the file must be whole
            content = http.get(f"/v1/videos/{job['id']}/content").content
            (tmp_path / "got.mp4").write_bytes(content)
            import imageio_ffmpeg

            assert imageio_ffmpeg.count_frames_and_secs(str(tmp_path / "got.mp4"))[0] == 5
        else:
            assert job["error"]["code"] == "write_failed" and "ffmpeg" not in job["error"]["message"].lower()
            assert outputs(tmp_path / "out") == []


def test_without_an_mp4_writer_a_video_model_is_not_ready(tiny_pipeline: Any, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails
    with serve_in_thread(create_app(tiny_pipeline, settings(tmp_path))) as url, httpx.Client(base_url=url) as http:
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "this model makes videos, and imageio-ffmpeg is not installed" in health.json()["error"]
        refused = http.post("/v1/videos", json={"prompt": "a cat", **SMALL})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_load_failed"
    image_model = SimpleNamespace(request_spec=dataclasses.replace(tiny_pipeline.request_spec, output="image"))
    check_writer(image_model)  # a model that makes images needs no MP4 writer
    with pytest.raises(OutputWriterMissing):
        check_writer(SimpleNamespace())


def test_serve_stops_at_start_up_when_ffmpeg_is_missing(tiny_wan_path: Path, tmp_path: Path) -> None:
    port = free_port()
    env = source_env(IMAGEIO_FFMPEG_EXE=str(tmp_path / "no-ffmpeg"))
    done = subprocess.run(
        [sys.executable, "-m", "ditserve.cli", "serve", "--model", str(tiny_wan_path), "--port", str(port),
         "--output-dir", str(tmp_path / "out"), "--log-level", "warning", "--no-warm-up"],
        env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"the ffmpeg binary {tmp_path / 'no-ffmpeg'} is missing or not executable" in done.stdout + done.stderr
