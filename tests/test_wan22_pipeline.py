"""Wan2.2 through the Wan family: T2V-A14B (two experts switched at the boundary, a guidance scale
each) and TI2V-5B (48-channel VAE, per-token timesteps; text-to-video and image-to-video), each
against diffusers' own pipeline on the same tiny random folder (float32, CPU), and batched vs alone.

Tolerance: relative to the largest frame value, 1e-4 vs diffusers (the issue's bound), 1e-5
batched vs alone.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ditserve
from ditserve.engine import InvalidRequest
from ditserve.pipelines import read_request_spec
from ditserve.pipelines.wan import WanPipeline
from helpers.checkpoints import build_tiny_wan22_a14b_pipeline, build_tiny_wan22_ti2v_pipeline

diffusers = pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL.Image")

PARITY_REL = 1e-4
BATCH_REL = 1e-5
PROMPT = dict(prompt="a red ball rolling on the street", negative_prompt="blurry, low quality")


def rel(a: np.ndarray, ref: np.ndarray) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def a14b_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_wan22_a14b_pipeline(tmp_path_factory.mktemp("a14b") / "pipeline", seed=0)


@pytest.fixture(scope="module")
def ti2v_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_wan22_ti2v_pipeline(tmp_path_factory.mktemp("ti2v") / "pipeline", seed=0)


@pytest.fixture(scope="module")
def a14b(a14b_path: Path) -> WanPipeline:
    return ditserve.Pipeline.from_pretrained(a14b_path, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def ti2v(ti2v_path: Path) -> WanPipeline:
    return ditserve.Pipeline.from_pretrained(ti2v_path, device="cpu", dtype="fp32")


def first_frame(height: int = 48, width: int = 80, seed: int = 0) -> Any:
    """A smooth random RGB picture (not the request's size: the pipeline resizes it as diffusers does)."""
    g = np.random.default_rng(seed)
    coarse = g.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    return PIL.fromarray(coarse).resize((width, height), PIL.BILINEAR)


# ----------------------------------------------------------------------------- the declarations


def test_each_variant_declares_its_own_request(a14b_path: Path, ti2v_path: Path) -> None:
    a14b = read_request_spec(a14b_path)
    assert [p.name for p in a14b.extras] == ["guidance_scale_2"] and not a14b.takes_image
    assert a14b.param("guidance_scale").default == 4.0 and a14b.param("guidance_scale_2").default == 3.0
    assert a14b.param("num_inference_steps").default == 40 and a14b.param("num_frames").default == 81
    ti2v = read_request_spec(ti2v_path)
    assert ti2v.takes_image and ti2v.extras == ()
    assert ti2v.param("height").multiple == ti2v.param("width").multiple == 32  # 16x VAE x 2x patch
    assert (ti2v.param("num_frames").default, ti2v.param("fps").default) == (121, 24.0)
    with pytest.raises(InvalidRequest, match="height must be an int, a multiple of 32"):
        ti2v.validate({**PROMPT, "height": 48})


# ----------------------------------------------------------------------------- A14B: two experts


A14B_REQUEST = dict(PROMPT, height=32, width=48, num_frames=5, num_inference_steps=6)


@pytest.mark.parametrize("scales", [(4.0, 3.0), (5.0, None), (1.0, 3.0)], ids=["two-scales", "same", "no-cfg"])
def test_a14b_matches_diffusers(a14b: WanPipeline, a14b_path: Path, scales: tuple[float, float | None]) -> None:
    guidance, guidance_2 = scales
    ours = a14b.generate(**A14B_REQUEST, guidance_scale=guidance, guidance_scale_2=guidance_2, seed=3).frames
    ref = diffusers.WanPipeline.from_pretrained(a14b_path)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(**A14B_REQUEST, guidance_scale=guidance, guidance_scale_2=guidance_2,
                 generator=torch.Generator("cpu").manual_seed(3), output_type="np").frames[0]
    assert ours.shape == theirs.shape == (5, 32, 48, 3)
    assert rel(ours, theirs) <= PARITY_REL


def test_a14b_uses_both_experts_and_the_second_scale(a14b: WanPipeline) -> None:
    prepared = a14b.prepare(a14b.validate(**A14B_REQUEST, guidance_scale=4.0, guidance_scale_2=3.0))
    experts = prepared.state.experts
    assert experts[0] == 0 and experts[-1] == 1 and list(experts) == sorted(experts)  # high noise first
    assert prepared.guidance.scales == tuple(4.0 if e == 0 else 3.0 for e in experts)
    a = a14b.generate(**A14B_REQUEST, guidance_scale=4.0, guidance_scale_2=3.0).frames
    b = a14b.generate(**A14B_REQUEST, guidance_scale=4.0, guidance_scale_2=30.0).frames
    assert rel(a, b) > 10 * PARITY_REL  # the low-noise expert's scale is used


def test_a14b_batch_mixes_experts_in_one_step_and_matches_alone(a14b: WanPipeline,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    requests = [dict(A14B_REQUEST, seed=1), dict(A14B_REQUEST, height=16, width=32, num_inference_steps=3, seed=2),
                dict(A14B_REQUEST, num_frames=1, guidance_scale=1.0, seed=3)]
    alone = [a14b.generate(**r).frames for r in requests]
    calls: list[list[int]] = []
    forward = [m.forward_packed for m in a14b.transformers]
    for index, model in enumerate(a14b.transformers):
        monkeypatch.setattr(model, "forward_packed",
                            lambda x, t, c, i=index, **kw: calls.append([i] * len(x)) or forward[i](x, t, c, **kw))
    # max_batch_size 1 at first would serialise; here request 1 (3 steps) reaches the low-noise
    # expert while request 0 (6 steps) is still on the high-noise one: one step, two forwards
    batched = a14b.generate_batch(requests)
    for got, ref in zip(batched, alone):
        assert rel(got.frames, ref) <= BATCH_REL
    experts = [c[0] for c in calls]
    # a step runs the high-noise forward before the low-noise one, so going back from 1 to 0 means a
    # step in which some request was still on the first expert after another had reached the second
    assert any(a == 1 and b == 0 for a, b in zip(experts, experts[1:])), experts


# ----------------------------------------------------------------------------- TI2V: 48 channels, per-token timesteps

TI2V_REQUEST = dict(PROMPT, height=32, width=64, num_frames=5, num_inference_steps=3, guidance_scale=5.0)


def test_ti2v_text_to_video_matches_diffusers(ti2v: WanPipeline, ti2v_path: Path) -> None:
    ours = ti2v.generate(**TI2V_REQUEST, seed=5).frames
    ref = diffusers.WanPipeline.from_pretrained(ti2v_path)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(**TI2V_REQUEST, generator=torch.Generator("cpu").manual_seed(5), output_type="np").frames[0]
    assert ours.shape == theirs.shape == (5, 32, 64, 3)
    assert rel(ours, theirs) <= PARITY_REL


@pytest.mark.parametrize("form", ["pil", "png-bytes", "array"])
def test_ti2v_image_to_video_matches_diffusers(ti2v: WanPipeline, ti2v_path: Path, form: str) -> None:
    picture = first_frame()
    given: Any = picture
    if form == "png-bytes":
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        given = buffer.getvalue()
    elif form == "array":
        given = np.asarray(picture)
    ours = ti2v.generate(**TI2V_REQUEST, image=given, seed=5).frames
    ref = diffusers.WanImageToVideoPipeline.from_pretrained(ti2v_path)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(image=picture, **TI2V_REQUEST, generator=torch.Generator("cpu").manual_seed(5),
                 output_type="np").frames[0]
    assert rel(ours, theirs) <= PARITY_REL
    text_only = ti2v.generate(**TI2V_REQUEST, seed=5).frames
    assert rel(ours, text_only) > 10 * PARITY_REL  # the image matters


def test_ti2v_batch_of_mixed_sizes_with_and_without_image_matches_alone(ti2v: WanPipeline) -> None:
    requests = [dict(TI2V_REQUEST, seed=1, image=first_frame(seed=1)),
                dict(TI2V_REQUEST, height=64, width=32, num_frames=9, num_inference_steps=2, seed=2),
                dict(TI2V_REQUEST, num_frames=1, guidance_scale=1.0, seed=3, image=first_frame(seed=3))]
    alone = [ti2v.generate(**r).frames for r in requests]
    for got, ref in zip(ti2v.generate_batch(requests), alone):
        assert rel(got.frames, ref) <= BATCH_REL


def test_bad_images_are_refused_before_any_work(ti2v: WanPipeline, a14b: WanPipeline, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ti2v, "prepare_batch", lambda *a, **k: pytest.fail("work started on a bad image"))
    with pytest.raises(InvalidRequest, match="image could not be decoded as a picture") as info:
        ti2v.generate(**TI2V_REQUEST, image=b"not an image at all")
    assert info.value.field == "image"
    with pytest.raises(InvalidRequest, match=r"image array must be uint8 \[H, W, 3\] \(RGB\), got float32 \[8, 8\]"):
        ti2v.generate(**TI2V_REQUEST, image=np.zeros((8, 8), np.float32))
    huge = io.BytesIO()
    PIL.new("RGB", (5000, 4000)).save(huge, format="PNG")
    with pytest.raises(InvalidRequest, match="image is 5000x4000, more than the 16777216 pixels accepted"):
        ti2v.generate(**TI2V_REQUEST, image=huge.getvalue())
    with pytest.raises(InvalidRequest, match="cannot be read"):
        ti2v.generate(**TI2V_REQUEST, image=tmp_path / "missing.png")
    with pytest.raises(InvalidRequest, match="this model does not take an input image"):
        a14b.generate(**A14B_REQUEST, image=first_frame())
    grey = PIL.new("LA", (40, 24), (128, 200))  # greyscale with alpha: converted to RGB
    monkeypatch.undo()
    assert ti2v.validate(**TI2V_REQUEST, image=grey).image.shape == (24, 40, 3)


# ----------------------------------------------------------------------------- GPU (bf16)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["a14b", "ti2v-t2v", "ti2v-i2v"])
def test_gpu_bf16_matches_diffusers(variant: str, a14b_path: Path, ti2v_path: Path) -> None:
    """Both Wan2.2 variants on the GPU in bf16 (VAE float32) against diffusers' pipelines run the same way."""
    path = a14b_path if variant == "a14b" else ti2v_path
    request = dict(A14B_REQUEST if variant == "a14b" else TI2V_REQUEST, height=64, width=64)
    extra: dict[str, Any] = {"image": first_frame()} if variant == "ti2v-i2v" else {}
    ours = ditserve.Pipeline.from_pretrained(path, device="cuda").generate(**request, **extra, seed=7).frames
    cls = diffusers.WanImageToVideoPipeline if extra else diffusers.WanPipeline
    ref = cls.from_pretrained(path, torch_dtype=torch.bfloat16)
    ref.vae.to(torch.float32)
    ref.to("cuda")
    ref.set_progress_bar_config(disable=True)
    theirs = ref(**request, **extra, generator=torch.Generator("cuda").manual_seed(7), output_type="np").frames[0]
    assert ours.shape == theirs.shape
    assert _psnr(ours, theirs) >= 35.0


def test_second_expert_offload_decision() -> None:
    gib = 2**30
    from ditserve.pipelines.wan import should_offload_second_expert

    assert not should_offload_second_expert(free_bytes=100 * gib, total_bytes=140 * gib, expert_bytes=28 * gib)
    # an 80 GB card with one A14B expert (28 GiB in bf16) and the text encoder loaded: about 40 GiB free
    assert should_offload_second_expert(free_bytes=40 * gib, total_bytes=80 * gib, expert_bytes=28 * gib)


def test_experts_offloaded_in_bf16_come_back_together_when_fp8_makes_them_fit() -> None:
    """The offload decision is taken at load, on bf16 sizes; after FP8 quantization both experts may fit."""
    from ditserve.models.fp8 import quantize_linears
    from ditserve.pipelines.wan import _Experts, _module_bytes

    experts = [torch.nn.Sequential(torch.nn.Linear(64, 64)).to(torch.bfloat16) for _ in range(2)]
    residency = _Experts(experts, torch.device("cpu"), offload=True)
    total = 1000 * _module_bytes(experts[0])
    free = int(0.25 * total + 0.75 * _module_bytes(experts[0]))  # the second bf16 expert leaves too little room
    assert not residency.keep_all_if_they_fit(free, total) and residency.offload
    quantize_linears(experts)  # one byte a weight instead of two
    assert residency.keep_all_if_they_fit(free, total) and not residency.offload
    assert residency.use(1) is experts[1] and residency.swaps == 0  # no switching any more


def test_offloaded_experts_give_the_same_video_and_switch_once(a14b: WanPipeline) -> None:
    """With only the expert in use resident, a request switches once (at the boundary) and its result is unchanged."""
    offloaded = WanPipeline(transformers=a14b.transformers, text_encoder=a14b.text_encoder, tokenizer=a14b.tokenizer,
                            vae=a14b.vae, new_scheduler=a14b.new_scheduler, device=a14b.device, dtype=a14b.dtype,
                            boundary_ratio=a14b.boundary_ratio, offload_experts=True)
    request = dict(A14B_REQUEST, guidance_scale=4.0, seed=2)
    assert rel(offloaded.generate(**request).frames, a14b.generate(**request).frames) <= BATCH_REL
    assert offloaded.residency.swaps == 1 and offloaded.residency.resident == 1
    assert offloaded.residency.order({0, 1}) == [1, 0]  # a mixed step starts with the resident expert


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_offloaded_expert_waits_in_host_memory(a14b_path: Path) -> None:
    pipe = ditserve.Pipeline.from_pretrained(a14b_path, device="cuda")
    on_gpu = pipe.generate(**A14B_REQUEST, seed=1).frames
    offloaded = WanPipeline(transformers=pipe.transformers, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                            vae=pipe.vae, new_scheduler=pipe.new_scheduler, device=pipe.device, dtype=pipe.dtype,
                            boundary_ratio=pipe.boundary_ratio, offload_experts=True)
    assert pipe.transformers[1].device.type == "cpu"
    frames = offloaded.generate(**A14B_REQUEST, seed=1).frames
    assert pipe.transformers[0].device.type == "cpu" and pipe.transformers[1].device.type == "cuda"
    assert _psnr(frames, on_gpu) >= 60.0
