"""Stage 1 of training: the Wan VAE as an autoencoder of rendered clips, then its latent statistics.

The loss is reconstruction MSE (pixels in [-1, 1]) on a sample of the posterior plus a small
KL term, which keeps the latent space smooth enough for the DiT to land in. Object pixels
weigh `object_weight` times more than background ones: the object covers ~5% of a frame, and
without the weight the VAE learns the backgrounds long before it bothers with the objects,
which are what the prompts are about. diffusers' `AutoencoderKLWan.decode` clamps its output
to [-1, 1]; a clamped pixel passes no gradient, so training decodes through
`decode_unclamped`, the same computation without the clamp.

`calibrate_latent` fixes a stall at the start: at diffusers' default initialisation a small
Wan VAE's latent varies across clips by ~0.03 while the posterior noise has std 1, so the
decoder sees noise and training plateaus for hundreds of steps before it finds the input.

`latent_statistics` gives the per-channel mean and std of the posterior means over many
clips; written into the VAE config as `latents_mean` / `latents_std`, they make the
pipeline's de-normalisation (`latents * std + mean` before decoding) the inverse of the
normalisation the DiT is trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ditserve.tiny.data import Scene, render_clips

from .schedule import StepPlan

__all__ = ["calibrate_latent", "clips_to_vae", "decode_unclamped", "latent_statistics", "object_mask",
           "sample_scenes", "train_vae"]

Log = Callable[[str], None]


def sample_scenes(scenes: Sequence[Scene], n: int, generator: torch.Generator) -> list[Scene]:
    """`n` scenes drawn uniformly with replacement."""
    idx = torch.randint(len(scenes), (n,), generator=generator)
    return [scenes[i] for i in idx.tolist()]


def clips_to_vae(clips: Tensor) -> Tensor:
    """(B, F, H, W, 3) in [0, 1] -> the VAE's (B, 3, F, H, W) in [-1, 1]."""
    return clips.permute(0, 4, 1, 2, 3).mul(2.0).sub(1.0).contiguous()


def object_mask(x: Tensor) -> Tensor:
    """(B, 1, F, H, W) 1.0 where a VAE-input pixel differs from its frame's corner (always background), else 0.0."""
    return ((x - x[..., :1, :1]).abs().amax(dim=1, keepdim=True) > 0.1).to(x.dtype)


@torch.no_grad()
def calibrate_latent(vae: torch.nn.Module, x: Tensor, logvar: float = -4.0) -> float:
    """Rescale `quant_conv` so the posterior mean spreads ~1 across the clips `x`, and start its std small.

    The mean half of the 1x1x1 `quant_conv` is scaled per channel by 1 / (spread across clips)
    and re-centred; the log-variance half starts at the constant `logvar`. Returns the spread
    found (diffusers' default init gives ~0.03).
    """
    found: dict[str, Tensor] = {}
    hook = vae.quant_conv.register_forward_hook(lambda module, inputs, output: found.setdefault("out", output))
    try:
        vae.encode(x)
    finally:
        hook.remove()
    z = vae.config.z_dim
    mean = found["out"][:, :z]
    spread = mean.std(dim=0).mean(dim=(1, 2, 3))  # per channel: across clips, averaged over positions
    scale = 1.0 / spread.clamp_min(1e-6)
    weight, bias = vae.quant_conv.weight, vae.quant_conv.bias
    weight[:z] *= scale.view(-1, 1, 1, 1, 1)
    bias[:z] = bias[:z] * scale - (mean * scale.view(1, -1, 1, 1, 1)).mean(dim=(0, 2, 3, 4))
    weight[z:] = 0.0
    bias[z:] = logvar
    return float(spread.mean())


def decode_unclamped(vae: torch.nn.Module, z: Tensor) -> Tensor:
    """diffusers' `AutoencoderKLWan._decode` (frame-causal, with its feature cache) minus the final clamp."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    outs = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        outs.append(vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                first_chunk=(i == 0)))
    vae.clear_cache()
    return torch.cat(outs, dim=2)


def train_vae(
    vae: torch.nn.Module,
    scenes: Sequence[Scene],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    kl_weight: float,
    object_weight: float,
    frames: int,
    generator: torch.Generator,
    device: torch.device,
    log: Log,
    max_seconds: float | None = None,
) -> dict[str, float]:
    """Train `vae` in place on freshly rendered clips; returns a summary for the training record.

    `frames`: train on each clip's first `frames` frames (4k+1). Shorter is cheaper but does not
    carry over: a VAE trained on 9 frames reconstructs frames 9-16 of a 17-frame clip badly (its
    frame-causal feature cache meets states it never saw), so the recipe uses all 17.
    `max_seconds`: fit the run into that many seconds (see `StepPlan`; the summary records the steps run).
    """
    calibration = clips_to_vae(render_clips(sample_scenes(scenes, 64, generator), generator, device=device)[:, :frames])
    log(f"vae: latent spread at init {calibrate_latent(vae, calibration):.3f}, rescaled to 1")
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    plan = StepPlan("vae", steps, lr, warmup=100, device=device, max_seconds=max_seconds, log=log)
    window, window_sum, last, done = 50, torch.zeros(2, device=device), [float("nan")] * 2, 0
    while done < plan.steps:
        for group in opt.param_groups:
            group["lr"] = plan.lr(done)
        clips = render_clips(sample_scenes(scenes, batch_size, generator), generator, device=device)
        x = clips_to_vae(clips[:, :frames])
        posterior = vae.encode(x).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator).to(device)
        z = posterior.mean + posterior.std * eps
        error = (decode_unclamped(vae, z) - x).pow(2)
        mask = object_mask(x)
        weight = 1.0 + object_weight * mask
        recon = (error * weight).mean() / weight.mean()
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        loss = recon + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        done += 1
        with torch.no_grad():
            window_sum += torch.stack([error.mean(), (error.mean(dim=1, keepdim=True) * mask).sum() / mask.sum()])
        stop = plan.finished(done)
        if done % window == 0 or stop:  # one host sync per window, not per step
            last = (window_sum / (done - (done - 1) // window * window)).tolist()
            window_sum.zero_()
            plan.show(mse=last[0], object_mse=last[1], kl=kl.item())
            log(f"vae step {done}/{plan.steps} mse {last[0]:.5f} object mse {last[1]:.4f} kl {kl.item():.3f} "
                f"({plan.elapsed():.0f}s)")
        if stop:
            break
    vae.eval()
    return {"vae_steps": done, "vae_mse": last[0], "vae_object_mse": last[1], "vae_seconds": plan.elapsed()}


@torch.no_grad()
def latent_statistics(
    vae: torch.nn.Module, scenes: Sequence[Scene], *, n: int, batch_size: int, generator: torch.Generator,
    device: torch.device,
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means of `n` rendered clips."""
    total = total_sq = None
    count = 0
    for first in range(0, n, batch_size):
        b = min(batch_size, n - first)
        x = clips_to_vae(render_clips(sample_scenes(scenes, b, generator), generator, device=device))
        mu = vae.encode(x).latent_dist.mean.double()  # (b, C, f, h, w)
        s, sq = mu.sum(dim=(0, 2, 3, 4)), mu.pow(2).sum(dim=(0, 2, 3, 4))
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += mu.numel() // mu.shape[1]
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    return [round(v, 6) for v in mean.tolist()], [round(v, 6) for v in std.tolist()]
