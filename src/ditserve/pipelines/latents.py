"""Latent stage: the seeded starting noise, drawn exactly like diffusers' `randn_tensor`.

The generator lives on the pipeline's device (diffusers called with
`generator=torch.Generator(device).manual_seed(seed)`): the same seed gives the same video
on the same kind of device. CPU and CUDA generators produce different streams, so a CPU
run and a GPU run of one seed differ; that is torch's behaviour, not ours.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["seeded_noise", "video_latent_shape"]


def video_latent_shape(
    channels: int, num_frames: int, height: int, width: int, *, temporal_factor: int, spatial_factor: int
) -> tuple[int, int, int, int, int]:
    """`(1, C, (F - 1) // t + 1, H // s, W // s)`: one video's latent (diffusers' prepare_latents)."""
    return (1, channels, (num_frames - 1) // temporal_factor + 1, height // spatial_factor, width // spatial_factor)


def seeded_noise(shape: Sequence[int], seed: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise from a fresh generator seeded with `seed` on `device`."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
