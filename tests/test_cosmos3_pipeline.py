"""Cosmos3 through the plug-in core: text to video and text to image against diffusers'
`Cosmos3OmniPipeline` on the same tiny random folders (float32, CPU, same seed), for both
backbones (nano: Karras flow sigmas and a system prompt; edge: the native flow schedule, none);
batched across sizes, steps and guidance vs alone; its declaration and its refusals before any
work; every interface (CLI, server, `ditserve ab`) on the tiny folder.

Tolerance: relative to the largest pixel value, 1e-4 vs diffusers, 1e-5 batched vs alone.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ditserve
from ditserve.engine import InvalidRequest
from ditserve.pipelines import read_request_spec

diffusers = pytest.importorskip("diffusers")

from helpers.cosmos3_checkpoints import build_tiny_cosmos3_pipeline

PARITY_REL = 1e-4
BATCH_REL = 1e-5
T2V = {"prompt": "a red ball rolling on the grass", "num_frames": 5, "height": 32, "width": 48,
       "num_inference_steps": 3}
T2I = {"prompt": "a cat in the snow", "num_frames": 1, "height": 48, "width": 32, "num_inference_steps": 3}
MODES = r"\(it serves text-to-video, and text-to-image with num_frames=1 only\)"


def rel(a: Any, ref: Any) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {b: build_tiny_cosmos3_pipeline(tmp_path_factory.mktemp(f"cosmos3-{b}") / "pipeline", seed=0, backbone=b)
            for b in ("nano", "edge")}


@pytest.fixture(scope="module")
def pipes(paths: dict[str, Path]) -> dict[str, Any]:
    return {b: ditserve.Pipeline.from_pretrained(p, device="cpu", dtype="fp32") for b, p in paths.items()}


def diffusers_frames(path: Path, seed: int, **request: Any) -> np.ndarray:
    ref = diffusers.Cosmos3OmniPipeline.from_pretrained(path)
    ref.set_progress_bar_config(disable=True)
    return ref(**request, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").video


def test_declaration(paths: dict[str, Path], pipes: dict[str, Any]) -> None:
    spec = read_request_spec(paths["nano"])
    assert spec.output == "video" and not spec.takes_image and spec.extras == ()
    defaults = spec.defaults()
    assert (defaults["width"], defaults["height"], defaults["num_frames"]) == (1280, 720, 189)
    assert (defaults["num_inference_steps"], defaults["guidance_scale"], defaults["fps"]) == (35, 6.0, 24.0)
    assert spec.param("height").multiple == 16 and spec.param("width").maximum == 4096  # the VAE's factor
    frames = spec.param("num_frames")
    assert (frames.multiple, frames.offset, frames.maximum) == (4, 1, 1021)
    assert spec.param("num_inference_steps").maximum == 1000  # the scheduler's num_train_timesteps
    assert pipes["nano"].request_spec == spec  # the loaded pipeline's spec is the folder's
    with pytest.raises(InvalidRequest, match=r"num_frames must be an int, of the form 4k\+1 \(1, 5, 9, \.\.\.\), "
                                             r"in \[1, 1021\], got 6"):
        spec.validate({"prompt": "a", "num_frames": 6})


def test_bad_values_and_other_modes_are_refused_before_any_work(pipes: dict[str, Any],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = pipes["nano"]
    monkeypatch.setattr(pipe, "prepare_batch", lambda *a, **k: pytest.fail("work started on a bad request"))
    for fields, field, message in [
        ({"height": 40}, "height", "height must be an int, a multiple of 16, in [16, 4096], got 40"),
        ({"num_inference_steps": 0}, "num_inference_steps", "num_inference_steps must be an int, in [1, 1000], got 0"),
        ({"guidance_scale": -1.0}, "guidance_scale", "guidance_scale must be a finite number, in [0, 100], got -1"),
        ({"fps": 0.5}, "fps", "fps must be a finite number, in [1, 120], got 0.5"),
    ]:
        with pytest.raises(InvalidRequest) as info:
            pipe.generate(**{**T2V, **fields})
        assert info.value.field == field and message in str(info.value)
    with pytest.raises(InvalidRequest, match=f"this model does not take an input image {MODES}") as info:
        pipe.generate(**T2V, image=np.zeros((32, 48, 3), np.uint8))
    assert info.value.field == "image"
    for other in ({"enable_sound": True}, {"video": [np.zeros((32, 48, 3), np.uint8)]}, {"action": "policy"}):
        with pytest.raises(InvalidRequest, match=rf"unknown parameter\(s\) \['{next(iter(other))}'\] for this model; "
                                                 rf"it takes: prompt, .*, fps {MODES}"):
            pipe.generate(**T2V, **other)


@pytest.mark.parametrize(("backbone", "request_", "guidance"), [
    ("nano", dict(T2V, negative_prompt="blurry, static"), 6.0),
    ("nano", T2I, 6.0),
    ("edge", dict(T2V, height=48, width=32, num_frames=9, fps=16.0, num_inference_steps=4), 3.0),
    ("edge", T2I, 1.0),
], ids=["nano-t2v-cfg", "nano-t2i-cfg", "edge-t2v-fps16", "edge-t2i-no-cfg"])
def test_matches_diffusers(paths: dict[str, Path], pipes: dict[str, Any], backbone: str, request_: dict[str, Any],
                           guidance: float) -> None:
    ours = pipes[backbone].generate(**request_, guidance_scale=guidance, seed=4).frames
    theirs = diffusers_frames(paths[backbone], 4, **request_, guidance_scale=guidance)
    frames, height, width = request_["num_frames"], request_["height"], request_["width"]
    assert ours.shape == theirs.shape == (frames, height, width, 3)
    assert 0.02 < theirs.std() and 0.001 < theirs.mean() < 0.999  # not a saturated picture
    assert rel(ours, theirs) <= PARITY_REL


def test_the_prompt_the_negative_prompt_and_fps_all_matter(pipes: dict[str, Any]) -> None:
    """Each input reaches the model: a parity test would pass on a pipeline that ignored them."""
    pipe = pipes["nano"]
    base = pipe.generate(**T2V, seed=1).frames
    for change in ({"prompt": "a blue cube"}, {"negative_prompt": "dark"}, {"fps": 16.0}):
        assert rel(pipe.generate(**{**T2V, **change}, seed=1).frames, base) > 100 * PARITY_REL, change


def test_a_batch_of_mixed_sizes_steps_and_guidance_matches_each_alone(pipes: dict[str, Any]) -> None:
    """Three requests in one engine: different sizes, frame counts (one image), steps, guidance (one
    without CFG), prompts and fps; with at most two at once the third joins mid-way (continuous batching)."""
    pipe = pipes["nano"]
    requests = [dict(T2V, seed=1, guidance_scale=6.0),
                dict(T2I, height=16, width=16, num_inference_steps=2, guidance_scale=1.0, seed=2),
                dict(T2V, height=48, width=32, num_frames=9, num_inference_steps=4, guidance_scale=3.0,
                     negative_prompt="dark", fps=16.0, seed=3)]
    alone = [pipe.generate(**r).frames for r in requests]
    for max_batch_size in (None, 2):
        for got, ref in zip(pipe.generate_batch(requests, max_batch_size=max_batch_size), alone):
            assert got.frames.shape == ref.shape and rel(got.frames, ref) <= BATCH_REL


def test_cli_writes_a_video_and_an_image(paths: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import imageio_ffmpeg
    from PIL import Image

    from ditserve import cli

    args = ["generate", "--model", str(paths["edge"]), "--prompt", "a red ball", "--height", "32", "--width", "48",
            "--steps", "2", "--device", "cpu", "--quiet"]
    video = tmp_path / "ball.mp4"
    assert cli.main([*args, "--num-frames", "5", "--output", str(video)]) == 0, capsys.readouterr().err
    assert imageio_ffmpeg.count_frames_and_secs(str(video))[0] == 5
    assert capsys.readouterr().out.startswith("5 frame(s) 48x32, 2 steps")
    image = tmp_path / "ball.png"
    assert cli.main([*args, "--num-frames", "1", "--output", str(image)]) == 0, capsys.readouterr().err
    assert Image.open(image).size == (48, 32)
    assert cli.main([*args, "--num-frames", "6", "--output", str(video)]) == 2
    assert "argument --num-frames: num_frames must be an int, of the form 4k+1" in capsys.readouterr().err


def test_the_server_makes_videos_and_images(pipes: dict[str, Any], tmp_path: Path) -> None:
    """POST /v1/videos (a 5-frame video) and /v1/images/generations (a single-frame run) on one model;
    an input image is a 400."""
    import time

    import httpx
    from helpers.server import serve_in_thread
    from PIL import Image

    from ditserve.server import ServerSettings, create_app

    app = create_app(pipes["nano"], ServerSettings(model_name="cosmos3", output_dir=tmp_path / "out"))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        job = http.post("/v1/videos", json={"prompt": "a ball", "size": "48x32", "num_frames": 5, "steps": 2, "seed": 1})
        assert job.status_code == 200, job.text
        image = http.post("/v1/images/generations", json={"prompt": "a cat", "size": "32x48", "steps": 2, "seed": 2})
        assert image.status_code == 200, image.text
        picture = Image.open(io.BytesIO(base64.b64decode(image.json()["data"][0]["b64_json"])))
        assert picture.size == (32, 48)
        deadline = time.monotonic() + 60
        while (status := http.get(f"/v1/videos/{job.json()['id']}").json()["status"]) not in ("completed", "failed"):
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert status == "completed"
        content = http.get(f"/v1/videos/{job.json()['id']}/content")
        assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
        refused = http.post("/v1/videos", data={"prompt": "a ball"},
                            files={"input_reference": ("a.png", b"\x89PNG", "image/png")})
        assert refused.status_code == 400 and "does not take an input image" in refused.text


def test_ab_compares_two_attention_configurations(paths: dict[str, Path]) -> None:
    from ditserve.ab import run_ab

    report = run_ab(paths["edge"], {"attention_backend": "auto"}, {"attention_backend": "reference"},
                    dict(T2V, num_inference_steps=2, seed=3), runs=1, warmup=0,
                    defaults={"device": "cpu", "dtype": "fp32"})
    assert report.request["fps"] == 24.0 and report.request["guidance_scale"] == 6.0  # the model's defaults
    assert report.comparison.psnr_db > 60
    assert report.baseline.runs[0].sha256 and report.candidate.runs[0].sha256


# ----------------------------------------------------------------------------- GPU (bf16)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("backbone", "request_"), [("nano", T2V), ("nano", T2I), ("edge", T2V)],
                         ids=["nano-t2v", "nano-t2i", "edge-t2v"])
def test_gpu_bf16_matches_diffusers(paths: dict[str, Path], backbone: str, request_: dict[str, Any]) -> None:
    """Ours in bf16 (VAE float32) against diffusers' pipeline in bf16 with its VAE in float32, 64x64."""
    request = dict(request_, height=64, width=64)
    ours = ditserve.Pipeline.from_pretrained(paths[backbone], device="cuda").generate(**request, seed=7).frames
    ref = diffusers.Cosmos3OmniPipeline.from_pretrained(
        paths[backbone], dtype={"transformer": torch.bfloat16, "default": torch.float32})
    ref.to("cuda")
    ref.set_progress_bar_config(disable=True)
    theirs = ref(**request, generator=torch.Generator("cuda").manual_seed(7), output_type="np").video
    assert ours.shape == theirs.shape
    assert _psnr(ours, theirs) >= 35.0
