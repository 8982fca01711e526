"""The Wan pipeline on the GPU (bf16): same video as diffusers' WanPipeline, eager and compiled."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ARGS = dict(prompt="a red circle moving left", negative_prompt="blurry", height=64, width=64, num_frames=9,
            num_inference_steps=4, guidance_scale=5.0)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@pytest.fixture(scope="module")
def reference_frames(tiny_wan_path):
    import diffusers

    pipe = diffusers.WanPipeline.from_pretrained(tiny_wan_path, torch_dtype=torch.bfloat16)
    pipe.vae.to(torch.float32)
    pipe.to("cuda")
    out = pipe(**ARGS, generator=torch.Generator("cuda").manual_seed(7), output_type="np")
    return out.frames[0]


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_gpu_bf16_matches_diffusers(tiny_wan_path, reference_frames, backend):
    from ditserve import Pipeline

    pipe = Pipeline.from_pretrained(tiny_wan_path, device="cuda", attention_backend=backend)
    assert pipe.dtype == torch.bfloat16
    frames = pipe.generate(**ARGS, seed=7).frames
    assert frames.shape == reference_frames.shape
    assert psnr(frames, reference_frames) >= 35.0


def test_gpu_compiled_matches_eager_and_repeats_bit_identically(tiny_wan_path):
    from ditserve import Pipeline

    pipe = Pipeline.from_pretrained(tiny_wan_path, device="cuda")
    eager = pipe.generate(**ARGS, seed=3).frames
    again = pipe.generate(**ARGS, seed=3).frames
    assert np.array_equal(eager, again)
    pipe.compile()
    compiled = pipe.generate(**ARGS, seed=3).frames
    assert psnr(compiled, eager) >= 35.0
