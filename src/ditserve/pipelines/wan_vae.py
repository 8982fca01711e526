"""The Wan VAE as Wan (2.1, 2.2) and Cosmos3 use it: its latent statistics and a decode that survives
running out of device memory."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["decode_videos", "latent_stats"]

log = logging.getLogger("ditserve.pipelines")


def latent_stats(vae: Any, z_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(mean, 1 / std) `[1, z_dim, 1, 1, 1]` of the VAE's latents, in its dtype on `device`: diffusers
    decodes `latents / (1 / std) + mean`."""
    shape = (1, z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(device, vae.dtype)
    return mean, 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(device, vae.dtype)


@torch.no_grad()
def decode_videos(vae: Any, latents: Tensor, mean: Tensor, inv_std: Tensor, device: torch.device) -> list[np.ndarray]:
    """Normalised latents `[B, C, F, H, W]` of one shape -> B frame arrays `(F, H, W, 3)` in [0, 1], in one
    VAE call in the VAE's dtype.

    If the VAE runs out of device memory (a large video on a small GPU), the decode is retried
    once in spatial tiles (diffusers' `enable_tiling`: overlapping tiles blended at the seams, a
    fraction of the memory); outputs then differ slightly, only at the tile seams.
    """
    latents = latents.to(device, vae.dtype)
    latents = latents / inv_std.to(latents.dtype) + mean.to(latents.dtype)
    try:
        video = vae.decode(latents, return_dict=False)[0]  # [B, 3, F, H, W] in [-1, 1]
    except torch.OutOfMemoryError:
        if getattr(vae, "use_tiling", True):
            raise
        log.warning("VAE decode of latents %s ran out of device memory; retrying in tiles", tuple(latents.shape))
        if latents.is_cuda:
            torch.cuda.empty_cache()
        vae.enable_tiling()
        try:
            video = vae.decode(latents, return_dict=False)[0]
        finally:
            vae.disable_tiling()
    video = (video * 0.5 + 0.5).clamp(0, 1)
    return list(video.permute(0, 2, 3, 4, 1).float().cpu().numpy())
