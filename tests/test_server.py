"""`ditserve serve` over real HTTP: a uvicorn server on 127.0.0.1 with the tiny Wan pipeline, httpx clients."""

from __future__ import annotations

import base64
import io
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import ditserve
from ditserve.loading import UnknownModelError
from ditserve.pipelines import read_request_spec
from ditserve.server import ServerSettings, create_app
from helpers.server import GatedPipeline, free_port, serve_in_thread, source_env, wait_healthy

SMALL = {"size": "32x32", "num_frames": 5, "steps": 2, "seed": 1}


def settings(tmp_path: Path, **overrides: Any) -> ServerSettings:
    return ServerSettings(**{"model_name": "tiny-wan", "output_dir": tmp_path / "out", **overrides})


def wait_for(client: httpx.Client, job_id: str, statuses: tuple[str, ...] = ("completed", "failed", "cancelled"),
             timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/videos/{job_id}").json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"{job_id} still {job['status']}"
        time.sleep(0.02)


def decoded_frames(path: Path) -> tuple[int, tuple[int, int]]:
    """(frame count, (width, height)) of a video, decoded by ffmpeg."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    size = next(reader)["size"]
    return sum(1 for _ in reader), size


def outputs(folder: Path) -> list[Path]:
    """What a server left in its output folder, less its state folder (.ditserve: job database, lock)."""
    return [p for p in folder.iterdir() if p.name != ".ditserve"]


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


# -- a job's life ---------------------------------------------------------------------------------

def test_video_job_life_from_create_to_content(tiny_pipeline: Any, tmp_path: Path) -> None:
    pipe = GatedPipeline(tiny_pipeline, gated=True)
    app = create_app(pipe, settings(tmp_path))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        created = http.post("/v1/videos", json={"prompt": "a red ball", **SMALL})
        assert created.status_code == 200, created.text
        job = created.json()
        assert job["object"] == "video" and job["id"].startswith("video_")
        assert job["status"] in ("queued", "in_progress") and job["model"] == "tiny-wan"
        assert (job["size"], job["num_frames"], job["num_inference_steps"], job["seed"]) == ("32x32", 5, 2, 1)
        assert isinstance(job["created_at"], int) and job["error"] is None

        assert pipe.running.wait(30)
        running = http.get(f"/v1/videos/{job['id']}").json()
        assert running["status"] == "in_progress" and running["started_at"] is not None
        assert running["total_steps"] == 2 and 0 <= running["progress"] < 100
        early = http.get(f"/v1/videos/{job['id']}/content")
        assert early.status_code == 409 and "in_progress" in error_of(early)["message"]

        pipe.gate.set()
        done = wait_for(http, job["id"])
        assert done["status"] == "completed", done
        assert done["progress"] == 100 and done["step"] == 2 and done["completed_at"] >= done["created_at"]
        for key in ("text_encode_s", "denoise_s", "decode_s", "total_s", "save_s", "job_s"):
            assert done["timings"][key] >= 0
        assert len(done["timings"]["per_step_s"]) == 2

        content = http.get(f"/v1/videos/{job['id']}/content")
        assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
        assert (tmp_path / "out" / f"{job['id']}.mp4").read_bytes() == content.content
        (tmp_path / "got.mp4").write_bytes(content.content)
        assert decoded_frames(tmp_path / "got.mp4") == (5, (32, 32))

        listed = http.get("/v1/videos").json()
        assert listed["object"] == "list" and [v["id"] for v in listed["data"]] == [job["id"]]
        deleted = http.delete(f"/v1/videos/{job['id']}")  # as OpenAI: a finished video is deleted, with its file
        assert deleted.status_code == 200 and deleted.json() == {"id": job["id"], "object": "video.deleted",
                                                                 "deleted": True}
        assert http.get(f"/v1/videos/{job['id']}").status_code == 404
        assert outputs(tmp_path / "out") == [] and http.get("/v1/videos").json()["data"] == []


def test_seconds_and_fps_give_the_frame_count(tiny_pipeline: Any, tmp_path: Path) -> None:
    with serve_in_thread(create_app(tiny_pipeline, settings(tmp_path))) as url, httpx.Client(base_url=url) as http:
        body = {"prompt": "a cat", "size": "32x32", "seconds": "0.5", "fps": 8, "num_inference_steps": 1}
        job = http.post("/v1/videos", json=body).json()
        assert (job["num_frames"], job["fps"], job["seconds"]) == (5, 8.0, "0.5")
        default_fps = http.post("/v1/videos", json={**body, "seconds": 0.25, "fps": None}).json()
        assert (default_fps["num_frames"], default_fps["fps"]) == (5, 16.0)
        assert wait_for(http, job["id"])["status"] == "completed"
        assert wait_for(http, default_fps["id"])["status"] == "completed"
        assert decoded_frames(tmp_path / "out" / f"{job['id']}.mp4") == (5, (32, 32))


# -- queueing -------------------------------------------------------------------------------------

def test_twenty_concurrent_requests_with_room_for_five(tiny_pipeline: Any, tmp_path: Path) -> None:
    pipe = GatedPipeline(tiny_pipeline, gated=True)  # nothing finishes while the 20 arrive
    app = create_app(pipe, settings(tmp_path, max_queue=5))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30,
                                                   limits=httpx.Limits(max_connections=20)) as http:
        first = http.post("/v1/videos", json={"prompt": "a dog first", **SMALL}).json()
        assert pipe.running.wait(30)  # in the batch, held in its first step: the 20 below must wait
        barrier = threading.Barrier(20)

        def post(i: int) -> httpx.Response:
            barrier.wait()
            return http.post("/v1/videos", json={"prompt": f"a dog {i}", **SMALL})

        with ThreadPoolExecutor(20) as pool:
            responses = list(pool.map(post, range(20)))
        assert {r.status_code for r in responses} <= {200, 429}
        accepted = [r.json()["id"] for r in responses if r.status_code == 200]
        rejected = [r for r in responses if r.status_code == 429]
        assert len(accepted) == 4 and len(rejected) == 16  # 5 unfinished at most: the running one counts
        assert len(set(accepted)) == len(accepted)
        assert {http.get(f"/v1/videos/{i}").json()["status"] for i in accepted} == {"queued"}
        for r in rejected:
            assert int(r.headers["Retry-After"]) >= 1
            assert error_of(r)["code"] == "queue_full" and "5 jobs accepted and not finished, --max-queue" in \
                error_of(r)["message"]
        metrics = http.get("/metrics").text
        assert "ditserve_queue_length 4.0" in metrics and "ditserve_jobs_running 1.0" in metrics

        pipe.gate.set()
        accepted.append(first["id"])
        finals = [wait_for(http, job_id) for job_id in accepted]
        assert [j["status"] for j in finals] == ["completed"] * len(accepted)
        assert sorted(v["id"] for v in http.get("/v1/videos").json()["data"]) == sorted(accepted)
        # each accepted request ran exactly once, with its own prompt; refused ones never ran
        accepted_prompts = [first["prompt"]] + [r.json()["prompt"] for r in responses if r.status_code == 200]
        assert sorted(pipe.prompts) == sorted(accepted_prompts) and len(set(pipe.prompts)) == len(pipe.prompts)
        assert sorted(p.name for p in outputs(tmp_path / "out")) == sorted(f"{i}.mp4" for i in accepted)
        metrics = http.get("/metrics").text
        assert f'ditserve_jobs_rejected_total{{reason="queue_full"}} {len(rejected)}.0' in metrics
        assert f'ditserve_jobs{{status="completed"}} {len(accepted)}.0' in metrics
        assert max(pipe.batch_sizes) == 2 * len(accepted)  # the 4 waiting joined the first one's batch


def test_cancel_a_queued_and_a_running_job(tiny_pipeline: Any, tmp_path: Path) -> None:
    pipe = GatedPipeline(tiny_pipeline, gated=True)
    with serve_in_thread(create_app(pipe, settings(tmp_path))) as url, httpx.Client(base_url=url) as http:
        running = http.post("/v1/videos", json={"prompt": "job 0", **SMALL}).json()["id"]
        assert pipe.running.wait(30)  # held in its first step; the next two wait for the step boundary
        queued, last = (http.post("/v1/videos", json={"prompt": f"job {i}", **SMALL}).json()["id"] for i in (1, 2))

        cancelled = http.delete(f"/v1/videos/{queued}")
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled" and cancelled.json()["error"]["code"] == "cancelled"
        assert "cancelled while queued" in cancelled.json()["error"]["message"]
        content = http.get(f"/v1/videos/{queued}/content")
        assert content.status_code == 409 and error_of(content)["code"] == "job_cancelled"

        stopping = http.delete(f"/v1/videos/{running}")  # held inside step 1: stops before step 2
        assert stopping.status_code == 200 and stopping.json()["status"] == "in_progress"
        pipe.gate.set()
        stopped = wait_for(http, running)
        # the step it was held in stops between the model's blocks: nobody waits for it any more
        assert stopped["status"] == "cancelled" and "before denoising step 1 of 2" in stopped["error"]["message"]
        again = http.delete(f"/v1/videos/{running}")  # finished now: deleted
        assert again.status_code == 200 and again.json()["object"] == "video.deleted"
        assert http.get(f"/v1/videos/{running}").status_code == 404

        assert wait_for(http, last)["status"] == "completed"
        assert pipe.prompts == ["job 0", "job 2"]  # the cancelled queued job never reached the model
        assert sorted(p.name for p in outputs(tmp_path / "out")) == [f"{last}.mp4"]


# -- failures -------------------------------------------------------------------------------------

def test_a_job_that_raises_fails_alone(tiny_pipeline: Any, tmp_path: Path) -> None:
    oom = RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
    pipe = GatedPipeline(tiny_pipeline, fail_decode={2: oom})  # the second job's VAE decode, after its last step
    with serve_in_thread(create_app(pipe, settings(tmp_path))) as url, httpx.Client(base_url=url) as http:
        ids = [http.post("/v1/videos", json={"prompt": f"job {i}", **SMALL}).json()["id"] for i in range(3)]
        first, second, third = (wait_for(http, i) for i in ids)
        assert first["status"] == "completed" and third["status"] == "completed"
        assert second["status"] == "failed" and second["error"]["code"] == "out_of_memory"
        assert second["error"]["message"] == ("the GPU ran out of memory for this request; try a smaller size or "
                                              "fewer frames") and second["step"] == 2  # no allocator text
        assert pipe.prompts == ["job 0", "job 1", "job 2"]  # admitted in submission order
        assert sorted(p.name for p in outputs(tmp_path / "out")) == sorted(f"{i}.mp4" for i in (ids[0], ids[2]))
        assert http.get("/health").status_code == 200
        assert 'ditserve_jobs_finished_total{status="failed"} 1.0' in http.get("/metrics").text


def test_a_failed_batched_step_fails_its_jobs_and_serving_goes_on(tiny_pipeline: Any, tmp_path: Path) -> None:
    oom = RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
    pipe = GatedPipeline(tiny_pipeline, gated=True, fail_forward={1: oom})
    with serve_in_thread(create_app(pipe, settings(tmp_path))) as url, httpx.Client(base_url=url) as http:
        in_step = http.post("/v1/videos", json={"prompt": "in the failing step", **SMALL}).json()["id"]
        assert pipe.running.wait(30)
        waiting = http.post("/v1/videos", json={"prompt": "waiting", **SMALL}).json()["id"]
        pipe.gate.set()
        failed = wait_for(http, in_step)
        assert failed["status"] == "failed" and failed["error"]["code"] == "out_of_memory" and failed["step"] == 0
        assert wait_for(http, waiting)["status"] == "completed"  # it was not in that forward
        assert sorted(p.name for p in outputs(tmp_path / "out")) == [f"{waiting}.mp4"]


def test_nan_output_fails_the_job_and_writes_nothing(tiny_pipeline: Any, tmp_path: Path) -> None:
    def poison(call: int, frames: np.ndarray) -> np.ndarray:
        return np.full_like(frames, np.nan) if call == 1 else frames

    pipe = GatedPipeline(tiny_pipeline, output_hook=poison)
    with serve_in_thread(create_app(pipe, settings(tmp_path))) as url, httpx.Client(base_url=url) as http:
        bad, good = (http.post("/v1/videos", json={"prompt": "a cat", **SMALL}).json()["id"] for _ in range(2))
        failed = wait_for(http, bad)
        assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_output"
        assert "NaN" in failed["error"]["message"]
        assert wait_for(http, good)["status"] == "completed"
        assert not (tmp_path / "out" / f"{bad}.mp4").exists()


# -- batching -------------------------------------------------------------------------------------

# different sizes, frame counts, step counts and guidance (1.0: no CFG, one sample); each size is
# unique, so the frames the server decoded say which request they belong to
MIXED = [
    {"prompt": "a red ball", "negative_prompt": "blurry", "size": "32x32", "num_frames": 5, "steps": 3,
     "guidance_scale": 5.0, "seed": 1},
    {"prompt": "a blue cube", "size": "48x32", "num_frames": 1, "steps": 2, "guidance_scale": 1.0, "seed": 2},
    {"prompt": "a green tree at night", "size": "32x48", "num_frames": 9, "steps": 4, "guidance_scale": 3.0,
     "seed": 3},
]


def _generate_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    width, height = (int(v) for v in body["size"].split("x"))
    return dict(prompt=body["prompt"], negative_prompt=body.get("negative_prompt", ""), height=height, width=width,
                num_frames=body["num_frames"], num_inference_steps=body["steps"],
                guidance_scale=body["guidance_scale"], seed=body["seed"])


@pytest.fixture(scope="module")
def mixed_alone(tiny_pipeline: Any) -> dict[tuple[int, ...], np.ndarray]:
    """Each MIXED request run alone through `Pipeline.generate`: frames by their shape."""
    frames = [tiny_pipeline.generate(**_generate_kwargs(body)).frames for body in MIXED]
    return {f.shape: f for f in frames}


def _histogram(metrics: str, name: str) -> dict[str, float]:
    """`le` -> cumulative count of a Prometheus histogram in /metrics text."""
    prefix = f'{name}_bucket{{le="'
    return {line[len(prefix):line.index('"}')]: float(line.split()[-1])
            for line in metrics.splitlines() if line.startswith(prefix)}


@pytest.mark.parametrize("max_batch_size", [None, 1], ids=["batched", "one-at-a-time"])
def test_concurrent_mixed_requests_share_steps_and_match_alone(
        tiny_pipeline: Any, mixed_alone: dict[tuple[int, ...], np.ndarray], tmp_path: Path,
        max_batch_size: int | None) -> None:
    pipe = GatedPipeline(tiny_pipeline, gated=True)
    app = create_app(pipe, settings(tmp_path, max_batch_size=max_batch_size))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        ids = [http.post(VIDEO, json=MIXED[0]).json()["id"]]
        assert pipe.running.wait(30)  # the first is in its first step; the others join at a later boundary
        ids += [http.post(VIDEO, json=body).json()["id"] for body in MIXED[1:]]
        pipe.gate.set()
        finals = [wait_for(http, job_id) for job_id in ids]
        assert [j["status"] for j in finals] == ["completed"] * len(MIXED)
        assert [j["step"] for j in finals] == [body["steps"] for body in MIXED]
        metrics = http.get("/metrics").text
    batch = _histogram(metrics, "ditserve_batch_size")
    steps = batch["+Inf"]
    if max_batch_size is None:
        assert batch["2.0"] < steps  # some step ran all three requests in one forward
        assert steps < sum(body["steps"] for body in MIXED)
        assert max(pipe.batch_sizes) == 2 + 1 + 2  # samples: CFG requests are two, guidance 1.0 one
    else:
        assert batch["1.0"] == steps == sum(body["steps"] for body in MIXED)  # one request per step
        assert "ditserve_max_batch_size 1.0" in metrics and max(pipe.batch_sizes) == 2
    # what the server decoded (and wrote) for each request equals that request run alone
    assert sorted(f.shape for f in pipe.decoded) == sorted(mixed_alone)
    for frames in pipe.decoded:
        ref = mixed_alone[frames.shape]
        assert np.abs(frames - ref).max() / np.abs(ref).max() <= 1e-5
    for job, body in zip(finals, MIXED):
        path = tmp_path / "out" / f"{job['id']}.mp4"
        assert decoded_frames(path) == (body["num_frames"], tuple(int(v) for v in body["size"].split("x")))


# -- validation -----------------------------------------------------------------------------------

VIDEO = "/v1/videos"
IMAGE = "/v1/images/generations"
BAD_REQUESTS = [
    # (path, JSON body or raw bytes, status, param, words in the message)
    (VIDEO, {"prompt": "x", "size": "big"}, 400, "size", "WIDTHxHEIGHT"),
    (VIDEO, {"prompt": "x", "size": "40x32"}, 400, "size", "width must be an int, a multiple of 16, in [16, 512], got 40"),
    (VIDEO, {"prompt": "x", "size": "4096x32"}, 400, "size", "in [16, 512], got 4096"),
    (VIDEO, {"prompt": "x", "size": "9" * 5000 + "x32"}, 400, "size", "WIDTHxHEIGHT"),
    (VIDEO, {"prompt": "x", "num_frames": 6}, 400, "num_frames", "4k+1 (1, 5, 9"),
    (VIDEO, {"prompt": "x", "steps": 0}, 400, "num_inference_steps", "num_inference_steps must be an int, in [1, 1000]"),
    (VIDEO, {"prompt": "x", "steps": 10**6}, 400, "num_inference_steps", "in [1, 1000], got 1000000"),
    (VIDEO, {"prompt": "x", "steps": 2**64}, 400, "num_inference_steps", f"got {2**64}"),
    (VIDEO, {"prompt": "x", "guidance_scale": -1}, 400, "guidance_scale", "a finite number, in [0, 100]"),
    (VIDEO, {"prompt": "   "}, 400, "prompt", "non-empty string"),
    (VIDEO, b'{"prompt": "\\ud800"}', 400, "prompt", "unpaired surrogate"),  # valid JSON, not valid text
    (VIDEO, b'{"prompt": "x", "negative_prompt": "a\\udc00"}', 400, "negative_prompt", "unpaired surrogate"),
    (VIDEO, {"prompt": "x" * 8193}, 400, "prompt", "at most 8192 characters, got 8193"),
    (VIDEO, {"prompt": "x", "seed": -1}, 400, "seed", "[0, 18446744073709551615]"),
    (VIDEO, {"prompt": "x", "size": "32x32", "num_frames": 201}, 400, "num_frames", "in [1, 125], got 201"),
    (VIDEO, {"prompt": "x", "seed": 2**64}, 400, "seed", "[0, 18446744073709551615]"),
    (VIDEO, {"prompt": "x", "negative_prompt": ["blurry"]}, 422, "negative_prompt", "valid string"),
    (VIDEO, {"prompt": "x", "seconds": 5, "fps": 16, "num_frames": 81}, 400, "seconds", "not both"),
    (VIDEO, {"prompt": "x", "seconds": "soon", "fps": 16}, 400, "seconds", "seconds must be a number in (0, 3600]"),
    (VIDEO, {"prompt": "x", "seconds": 1e308}, 400, "seconds", "seconds must be a number in (0, 3600]"),
    (VIDEO, {"prompt": "x", "seconds": "1e308"}, 400, "seconds", "seconds must be a number in (0, 3600]"),
    (VIDEO, {"prompt": "x", "num_frames": 5, "fps": 0}, 400, "fps", "fps must be a finite number, in [1, 120]"),
    (VIDEO, {"prompt": "x", "num_frames": 5, "fps": 1e308}, 400, "fps", "in [1, 120], got 1e+308"),
    (VIDEO, {"prompt": "x", "num_frames": 5, "fps": 1e-5}, 400, "fps", "in [1, 120], got 1e-05"),
    (VIDEO, {"prompt": "x", "seconds": 1, "fps": 1e-300}, 400, "fps", "in [1, 120], got 1e-300"),
    (VIDEO, {"prompt": "x", "model": "sora-2"}, 404, "model", "'sora-2' is not served here; this server serves"),
    (VIDEO, {"prompt": 7}, 422, "prompt", "valid string"),
    (VIDEO, {"prompt": "x", "steps": "2"}, 422, "steps", "valid integer"),
    (VIDEO, {"prompt": "x", "num_frames": 5.0}, 422, "num_frames", "valid integer"),
    (VIDEO, {"prompt": "x", "guidance_scale": True}, 422, "guidance_scale", "valid number"),
    (VIDEO, {"prompt": "x", "duration": 5}, 422, "duration", "unknown field; accepted fields: prompt,"),
    (VIDEO, {"prompt": "x", "guidance_scale_2": 3.0}, 422, "guidance_scale_2", "unknown field"),
    (VIDEO, {"size": "32x32"}, 422, "prompt", "prompt: field required"),
    (VIDEO, b'{"prompt": "x",', 422, None, "not valid JSON"),
    (VIDEO, b'["prompt"]', 422, None, "must be a JSON object"),
    (IMAGE, {"prompt": "x", "n": 2}, 400, "n", "n must be 1"),
    (IMAGE, {"prompt": "x", "response_format": "png"}, 422, "response_format", "'b64_json' or 'url'"),
    (IMAGE, {"prompt": "x", "num_frames": 5}, 422, "num_frames", "unknown field"),
    (IMAGE, {"prompt": "x", "size": "32x31"}, 400, "size", "height must be an int, a multiple of 16"),
    (IMAGE, {"prompt": "x", "seed": 1.5}, 422, "seed", "valid integer"),
    (IMAGE, b'{"prompt": "\\ud800"}', 400, "prompt", "unpaired surrogate"),
]


@pytest.fixture(scope="module")
def counting_server(tiny_pipeline: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    pipe = GatedPipeline(tiny_pipeline)
    app = create_app(pipe, settings(tmp_path_factory.mktemp("bad")))
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        yield http, pipe


@pytest.mark.parametrize(("path", "body", "status", "param", "words"), BAD_REQUESTS,
                         ids=[f"{i}-{b if isinstance(b, bytes) else list(b)[-1]}" for i, (_, b, *_) in
                              enumerate(BAD_REQUESTS)])
def test_bad_requests_are_refused_before_the_pipeline(counting_server: Any, path: str, body: Any, status: int,
                                                      param: str | None, words: str) -> None:
    http, pipe = counting_server
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["param"] == param and words in error["message"], error
    assert pipe.calls == 0


def test_unknown_ids_and_routes_are_404(counting_server: Any) -> None:
    http, _ = counting_server
    for method, path in [("GET", "/v1/videos/video_nope"), ("GET", "/v1/videos/video_nope/content"),
                         ("DELETE", "/v1/videos/video_nope"), ("GET", "/v1/files/img_nope/content"),
                         ("GET", "/v2/nothing")]:
        response = http.request(method, path)
        assert response.status_code == 404, (method, path)
        assert error_of(response)["message"]
    assert "no video with id 'video_nope'" in error_of(http.get("/v1/videos/video_nope"))["message"]


# -- images ---------------------------------------------------------------------------------------

def test_image_generation_b64_and_url(tiny_pipeline: Any, tmp_path: Path) -> None:
    from PIL import Image

    with serve_in_thread(create_app(tiny_pipeline, settings(tmp_path))) as url, httpx.Client(base_url=url) as http:
        body = {"prompt": "a red ball", "size": "48x32", "steps": 2, "seed": 3}
        b64 = http.post(IMAGE, json=body)
        assert b64.status_code == 200, b64.text
        item = b64.json()["data"][0]
        assert set(b64.json()) == {"created", "data"} and item["seed"] == 3 and "url" not in item
        image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
        assert (image.format, image.size) == ("PNG", (48, 32))

        by_url = http.post(IMAGE, json={**body, "response_format": "url"}).json()["data"][0]
        assert by_url["url"].startswith(url + "/v1/files/img_") and "b64_json" not in by_url
        fetched = http.get(by_url["url"])
        assert fetched.headers["content-type"] == "image/png"
        assert fetched.content == base64.b64decode(item["b64_json"])  # same seed, same image


# -- service endpoints, retention, loading, shutdown ---------------------------------------------

def test_health_models_and_metrics(tiny_pipeline: Any, tmp_path: Path) -> None:
    with serve_in_thread(create_app(tiny_pipeline, settings(tmp_path))) as url, httpx.Client(base_url=url) as http:
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        models = http.get("/v1/models").json()
        assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny-wan"]
        wait_for(http, http.post(VIDEO, json={"prompt": "a bird", **SMALL}).json()["id"])
        metrics = http.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        for name in ("ditserve_queue_length 0.0", 'ditserve_jobs{status="completed"} 1.0',
                     'ditserve_jobs{status="queued"} 0.0', "ditserve_jobs_running 0.0", "ditserve_model_ready 1.0",
                     'ditserve_step_seconds_bucket{le="+Inf"} 2.0', "ditserve_step_seconds_sum",
                     'ditserve_job_seconds_bucket{le="+Inf"} 1.0', 'ditserve_jobs_submitted_total{kind="video"} 1.0',
                     "ditserve_queue_wait_seconds_count 1.0", 'ditserve_batch_size_bucket{le="1.0"} 2.0',
                     "ditserve_batch_size_count 2.0", "ditserve_batch_tokens_count 2.0", "ditserve_last_batch_size 1.0",
                     "ditserve_max_batch_size 0.0", "ditserve_max_batch_tokens 65536.0",
                     "ditserve_jobs_paused 0.0", "ditserve_jobs_decoding 0.0"):
            assert name in metrics.text, name
        request = tiny_pipeline.validate("a bird", height=32, width=32, num_frames=5, guidance_scale=5.0)
        assert f"ditserve_last_batch_tokens {tiny_pipeline.tokens_per_step(request)}.0" in metrics.text


def test_keep_jobs_deletes_the_oldest_finished_jobs_and_files(tiny_pipeline: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".video_old.mp4.x1y2.mp4").write_bytes(b"half a video from a crash")
    with serve_in_thread(create_app(tiny_pipeline, settings(tmp_path, keep_jobs=2))) as url, \
            httpx.Client(base_url=url) as http:
        assert not (out / ".video_old.mp4.x1y2.mp4").exists()  # partial files are cleaned at start
        ids = []
        for i in range(3):
            ids.append(http.post(VIDEO, json={"prompt": f"job {i}", **SMALL}).json()["id"])
            wait_for(http, ids[-1])
        assert http.get(f"/v1/videos/{ids[0]}").status_code == 404
        assert [http.get(f"/v1/videos/{i}").json()["status"] for i in ids[1:]] == ["completed"] * 2
        assert sorted(p.name for p in outputs(out)) == sorted(f"{i}.mp4" for i in ids[1:])


def test_health_is_503_while_loading_and_after_a_failed_load(tiny_pipeline: Any, tmp_path: Path) -> None:
    loaded = threading.Event()

    def slow_factory() -> Any:
        assert loaded.wait(30)
        return tiny_pipeline

    spec = tiny_pipeline.request_spec  # what `serve` reads from the folder before loading
    with serve_in_thread(create_app(slow_factory, settings(tmp_path), spec=spec)) as url, \
            httpx.Client(base_url=url) as http:
        health = http.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        early = http.post(VIDEO, json={"prompt": "x", **SMALL})
        assert early.status_code == 503 and error_of(early)["code"] == "model_loading"
        loaded.set()
        deadline = time.monotonic() + 30
        while http.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)

    failures: list[BaseException] = []

    def broken_factory() -> Any:
        raise OSError("transformer/diffusion_pytorch_model.safetensors: truncated file")

    app = create_app(broken_factory, settings(tmp_path), spec=spec, on_load_failure=failures.append)
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        deadline = time.monotonic() + 30
        while not failures:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "truncated file" in health.json()["error"]


def test_shutdown_refuses_new_jobs_with_503(tiny_pipeline: Any, tmp_path: Path) -> None:
    app = create_app(tiny_pipeline, settings(tmp_path))
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        app.state.ditserve.request_shutdown()  # what SIGTERM does first
        deadline = time.monotonic() + 10
        while http.get("/health").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert http.get("/health").json() == {"status": "shutting_down"}
        refused = http.post(VIDEO, json={"prompt": "late", **SMALL})
        assert refused.status_code == 503 and error_of(refused)["code"] == "shutting_down"


def test_sigterm_cancels_the_running_job_and_exits_cleanly(tiny_wan_path: Path, tmp_path: Path) -> None:
    out, port = tmp_path / "out", free_port()
    env = source_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ditserve.cli", "serve", "--model", str(tiny_wan_path), "--port", str(port),
         "--output-dir", str(out), "--max-queue", "2", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            wait_healthy(proc, http)
            kept = http.post(VIDEO, json={"prompt": "a short one", **SMALL}).json()["id"]
            assert wait_for(http, kept)["status"] == "completed"
            long = http.post(VIDEO, json={"prompt": "a long one", **SMALL, "steps": 1000}).json()["id"]
            http.post(VIDEO, json={"prompt": "waiting", **SMALL})
            job = wait_for(http, long, statuses=("in_progress",))
            while job["step"] < 1:
                job = http.get(f"/v1/videos/{long}").json()
            assert job["status"] == "in_progress"
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=20)[0]
        assert proc.returncode == 0 and "Traceback" not in output, output
        assert time.monotonic() - sent < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # the finished video stays; the cancelled ones left nothing, not even a temporary file
    assert [p.name for p in outputs(out)] == [f"{kept}.mp4"]
    assert decoded_frames(out / f"{kept}.mp4") == (5, (32, 32))


def test_serve_refuses_bad_options_before_opening_the_port(tmp_path: Path, tiny_wan_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from ditserve.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--max-queue", "0"]) == 2
    assert "max_queue must be >= 1" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert main(["serve", "--model", str(tmp_path), "--output-dir", str(tmp_path / "a_file")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--max-batch-size", "0"]) == 2
    assert "max_batch_size must be >= 1 (1 runs one job at a time), got 0" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--max-batch-tokens", "-5"]) == 2
    assert "max_batch_tokens must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_wan_path), "--device", "cpu", "--attention-backend", "triton_fp8"]) == 2
    assert ("attention backend 'triton_fp8' cannot run on cpu in float32: runs on ['cuda'], not cpu; choose 'auto' or one "
            "of [") in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--shutdown-timeout", "0"]) == 2
    assert "shutdown_timeout_s (--shutdown-timeout) must be a number of seconds > 0, got 0.0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as not_a_number:
        main(["serve", "--model", str(tmp_path), "--max-batch-size", "all"])
    assert not_a_number.value.code == 2
    assert "argument --max-batch-size: invalid int value: 'all'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_batch_tokens must be an int >= 1, got 1.5"):
        ServerSettings(max_batch_tokens=1.5)  # type: ignore[arg-type]


def test_a_folders_request_defaults_fill_what_the_client_leaves_out(tiny_wan_path: Path, tmp_path: Path) -> None:
    """A small model (the embedded one) ships its own defaults (`request_defaults.json`): a bare request must not
    default to Wan's 832x480x81, and the client's fields still win."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_wan_path, folder)
    defaults = {"height": 32, "width": 48, "num_frames": 5, "num_inference_steps": 2, "guidance_scale": 3.0}
    (folder / "request_defaults.json").write_text(json.dumps(defaults))
    pipe = ditserve.Pipeline.from_pretrained(folder, device="cpu")
    app = create_app(GatedPipeline(pipe), settings(tmp_path / "out"))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        bare = http.post("/v1/videos", json={"prompt": "a red ball"}).json()
        assert (bare["size"], bare["num_frames"], bare["num_inference_steps"], bare["guidance_scale"]) == ("48x32", 5, 2, 3.0)
        sized = http.post("/v1/videos", json={"prompt": "a red ball", "size": "32x16", "num_frames": 1}).json()
        assert (sized["size"], sized["num_frames"], sized["num_inference_steps"]) == ("32x16", 1, 2)  # client wins
        assert wait_for(http, bare["id"])["status"] == "completed"
    (folder / "request_defaults.json").write_text(json.dumps({"steps": 2}))
    with pytest.raises(UnknownModelError, match=r"request_defaults.json: unknown request parameter\(s\) \['steps'\]"):
        read_request_spec(folder)
    (folder / "request_defaults.json").write_text(json.dumps({"height": 20}))
    with pytest.raises(UnknownModelError, match=r"default height must be an int, a multiple of 16, .* got 20"):
        read_request_spec(folder)


def test_a_client_that_disconnects_from_an_image_cancels_it(tiny_pipeline: Any, tmp_path: Path) -> None:
    pipe = GatedPipeline(tiny_pipeline, gated=True)
    app = create_app(pipe, settings(tmp_path))
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            http.post(IMAGE, json={"prompt": "nobody waits for me", "size": "32x32", "steps": 3}, timeout=1.0)
        [job] = app.state.ditserve.store.jobs()
        deadline = time.monotonic() + 10
        while not job.cancel_event.is_set():  # noticed within a poll or two
            assert time.monotonic() < deadline, "the disconnect was not noticed"
            time.sleep(0.02)
        pipe.gate.set()  # held before its first step's forward
        while not job.status.finished:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        snap = job.snapshot()
        # held in its first step, which stops between the model's blocks once nobody waits for it
        assert snap.status.value == "cancelled" and snap.step == 0 and len(pipe.batch_sizes) == 1
        assert outputs(tmp_path / "out") == []
        assert 'ditserve_jobs_finished_total{status="cancelled"} 1.0' in http.get("/metrics").text


def test_operator_limits_tighten_the_models_own_and_name_their_flag(tiny_pipeline: Any, tmp_path: Path) -> None:
    app = create_app(tiny_pipeline, settings(tmp_path, max_steps=4, max_frames=9, max_pixels=32 * 48,
                                             max_batch_tokens=30))
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        for body, param, words in (
            ({"steps": 5}, "num_inference_steps", "in [1, 4], (max set by --max-steps), got 5"),
            ({"num_frames": 13}, "num_frames", "in [1, 9], (max set by --max-frames), got 13"),
            ({"size": "64x32"}, "size", "at most 1536 pixels per frame (--max-pixels), got 32x64 = 2048"),
        ):
            response = http.post(VIDEO, json={"prompt": "x", "size": "32x32", "num_frames": 5, **body})
            assert response.status_code == 400, response.text
            assert error_of(response)["param"] == param and words in error_of(response)["message"], response.text
        big = http.post(VIDEO, json={"prompt": "x", "size": "48x32", "num_frames": 9, "steps": 2, "seed": 1})
        assert big.status_code == 400 and error_of(big)["param"] == "size"
        assert "needs 36 tokens per denoising step" in error_of(big)["message"]
        assert "one step holds at most 30 (--max-batch-tokens" in error_of(big)["message"]
        ok = http.post(VIDEO, json={"prompt": "x", "size": "32x32", "num_frames": 5, "steps": 2, "seed": 1})
        assert ok.status_code == 200 and wait_for(http, ok.json()["id"])["status"] == "completed"
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        settings(tmp_path, max_steps=0)
