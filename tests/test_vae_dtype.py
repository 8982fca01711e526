"""The opt-in bf16 VAE decode (`vae_dtype`): the VAE is cast, frames stay close to the float32 decode,
and a bad value is refused naming the option."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import ditserve
from ditserve.ab import parse_config
from ditserve.pipelines.errors import PipelineConfigError

REQUEST = dict(prompt="a red ball", height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=4.0,
               seed=3)


def test_bf16_vae_decodes_close_to_float32(tiny_wan_path: Path) -> None:
    exact = ditserve.Pipeline.from_pretrained(tiny_wan_path, device="cpu", dtype="fp32")
    fast = ditserve.Pipeline.from_pretrained(tiny_wan_path, device="cpu", dtype="fp32", vae_dtype="bf16")
    assert exact.vae.dtype == torch.float32 and fast.vae.dtype == torch.bfloat16
    assert fast.transformer.dtype == torch.float32  # only the VAE changes
    a, b = exact.generate(**REQUEST).frames, fast.generate(**REQUEST).frames
    mse = float(np.mean((a - b) ** 2))
    assert b.dtype == np.float32 and 0 < mse and 10 * math.log10(1 / mse) >= 35


def test_bad_vae_dtype_is_refused_before_loading(tiny_wan_path: Path) -> None:
    with pytest.raises(PipelineConfigError, match="^vae_dtype must be one of bf16, "):
        ditserve.Pipeline.from_pretrained(tiny_wan_path, device="cpu", vae_dtype="fp8")
    assert parse_config("vae_dtype=bf16") == {"vae_dtype": "bf16"}
