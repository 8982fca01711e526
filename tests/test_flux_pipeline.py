"""Flux.1 through the plug-in core: dev (guidance embedding) and schnell (none), against diffusers'
`FluxPipeline` on the same tiny random folder (float32, CPU); batched across image sizes vs alone;
its declaration (an image model) as every interface sees it.

Tolerance: relative to the largest pixel value, 1e-4 vs diffusers, 1e-5 batched vs alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ditserve
from ditserve.engine import InvalidRequest
from ditserve.pipelines import read_request_spec

from helpers.checkpoints import build_tiny_flux_pipeline

diffusers = pytest.importorskip("diffusers")

PARITY_REL = 1e-4
BATCH_REL = 1e-5
REQUEST = dict(prompt="a red ball on the grass", height=32, width=48, num_inference_steps=3)


def rel(a: Any, ref: Any) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module", params=["dev", "schnell"])
def flux(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Any]:
    path = build_tiny_flux_pipeline(tmp_path_factory.mktemp(f"flux-{request.param}") / "pipeline",
                                                seed=0, guidance_embeds=request.param == "dev")
    return request.param, path, ditserve.Pipeline.from_pretrained(path, device="cpu", dtype="fp32")


def diffusers_image(path: Path, variant: str, seed: int, **kwargs: Any) -> np.ndarray:
    ref = diffusers.FluxPipeline.from_pretrained(path)
    ref.set_progress_bar_config(disable=True)
    out = ref(**kwargs, max_sequence_length=512 if variant == "dev" else 256,
              generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return out.images[0]


def test_declaration(flux: tuple[str, Path, Any]) -> None:
    variant, path, _ = flux
    spec = read_request_spec(path)
    assert spec.output == "image" and [p.name for p in spec.extras] == ["true_cfg_scale"]
    steps, guidance = (28, 3.5) if variant == "dev" else (4, 0.0)
    assert (spec.param("num_inference_steps").default, spec.param("guidance_scale").default) == (steps, guidance)
    assert (spec.param("height").default, spec.param("width").default) == (1024, 1024)
    with pytest.raises(InvalidRequest, match=r"num_frames must be an int, in \[1, 1\], got 5"):
        spec.validate({"prompt": "a", "num_frames": 5})


@pytest.mark.parametrize("guidance", [3.5, 1.0])
def test_matches_diffusers(flux: tuple[str, Path, Any], guidance: float) -> None:
    variant, path, pipe = flux
    ours = pipe.generate(**REQUEST, guidance_scale=guidance, seed=4).frames
    theirs = diffusers_image(path, variant, 4, **REQUEST, guidance_scale=guidance)
    assert ours.shape == (1, 32, 48, 3) and theirs.shape == (32, 48, 3)
    assert rel(ours[0], theirs) <= PARITY_REL


def test_true_cfg_with_a_negative_prompt_matches_diffusers(flux: tuple[str, Path, Any]) -> None:
    variant, path, pipe = flux
    ours = pipe.generate(**REQUEST, negative_prompt="blurry", true_cfg_scale=2.0, seed=5).frames
    theirs = diffusers_image(path, variant, 5, **REQUEST, negative_prompt="blurry", true_cfg_scale=2.0,
                             guidance_scale=pipe.request_spec.param("guidance_scale").default)
    assert rel(ours[0], theirs) <= PARITY_REL
    plain = pipe.generate(**REQUEST, seed=5).frames
    assert rel(ours, plain) > 10 * PARITY_REL  # the negative prompt is used


def test_a_batch_of_three_sizes_matches_each_alone(flux: tuple[str, Path, Any]) -> None:
    _, _, pipe = flux
    requests = [dict(REQUEST, seed=1), dict(REQUEST, height=16, width=16, num_inference_steps=2, seed=2),
                dict(REQUEST, height=48, width=32, seed=3, negative_prompt="dark", true_cfg_scale=3.0)]
    alone = [pipe.generate(**r).frames for r in requests]
    for got, ref in zip(pipe.generate_batch(requests), alone):
        assert got.frames.shape == ref.shape and rel(got.frames, ref) <= BATCH_REL


def test_every_interface_serves_it_as_an_image_model(flux: tuple[str, Path, Any], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """`ditserve generate` writes a .png (and refuses a video file); the server makes images and answers
    /v1/videos with 400."""
    import base64
    import io

    import httpx
    from PIL import Image

    from ditserve import cli
    from ditserve.server import ServerSettings, create_app
    from helpers.server import serve_in_thread

    variant, path, pipe = flux
    if variant == "schnell":
        pytest.skip("one variant is enough for the interfaces")
    out = tmp_path / "ball.png"
    args = ["generate", "--model", str(path), "--prompt", "a red ball", "--height", "32", "--width", "48",
            "--steps", "2", "--device", "cpu", "--quiet"]
    assert cli.main([*args, "--output", str(out)]) == 0, capsys.readouterr().err
    assert Image.open(out).size == (48, 32)
    assert cli.main([*args, "--output", str(tmp_path / "ball.mp4")]) == 2
    assert "this model makes images; write a .png" in capsys.readouterr().err
    app = create_app(pipe, ServerSettings(model_name="flux", output_dir=tmp_path / "out"))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        video = http.post("/v1/videos", json={"prompt": "a ball", "size": "48x32"})
        assert video.status_code == 400 and "makes images, not videos" in video.json()["error"]["message"]
        made = http.post("/v1/images/generations", json={"prompt": "a ball", "size": "48x32", "steps": 2, "seed": 1})
        assert made.status_code == 200, made.text
        image = Image.open(io.BytesIO(base64.b64decode(made.json()["data"][0]["b64_json"])))
        assert image.size == (48, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_matches_diffusers(flux: tuple[str, Path, Any]) -> None:
    variant, path, _ = flux
    request = dict(REQUEST, height=64, width=64)
    ours = ditserve.Pipeline.from_pretrained(path, device="cuda").generate(**request, seed=7).frames[0]
    ref = diffusers.FluxPipeline.from_pretrained(path, torch_dtype=torch.bfloat16)  # its VAE in bf16 (ours: float32)
    ref.to("cuda")
    ref.set_progress_bar_config(disable=True)
    theirs = ref(**request, max_sequence_length=512 if variant == "dev" else 256,
                 generator=torch.Generator("cuda").manual_seed(7), output_type="np").images[0]
    mse = float(np.mean((ours.astype(np.float64) - theirs) ** 2))
    assert mse == 0 or 10 * np.log10(1 / mse) >= 30.0


def test_ab_compares_two_configurations_of_an_image_model(flux: tuple[str, Path, Any]) -> None:
    from ditserve.ab import run_ab

    variant, path, _ = flux
    report = run_ab(path, {"attention_backend": "sdpa"}, {"attention_backend": "reference"},
                    dict(prompt="a red ball", height=32, width=48, num_inference_steps=2, seed=3), runs=1, warmup=0,
                    defaults={"device": "cpu", "dtype": "fp32"})
    assert report.request["num_frames"] == 1 and report.request["true_cfg_scale"] == 1.0  # the model's defaults
    assert report.comparison.psnr_db > 60  # two attention backends, the same image
    assert report.baseline.runs[0].sha256 and report.candidate.runs[0].sha256
