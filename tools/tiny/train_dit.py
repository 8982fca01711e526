"""Stage 2 of training: the Wan DiT (and the text encoder with it) by flow matching on VAE latents.

The objective is the one Wan's scheduler integrates (`UniPCMultistepScheduler` with
`use_flow_sigmas`, `prediction_type="flow_prediction"`):

    sigma  = shift * u / (1 + (shift - 1) * u),  u ~ U(0, 1)   (the scheduler's shifted sigmas)
    x_t    = (1 - sigma) * x0 + sigma * noise
    target = noise - x0                                          (x0 = x_t - sigma * prediction)
    timestep passed to the DiT = sigma * 1000                    (num_train_timesteps)

x0 are VAE posterior means normalised with the latents_mean / latents_std written into the
VAE config. With probability `drop_prob` a sample's text is the empty prompt's encoding,
which is what the pipeline feeds as the negative prompt: classifier-free guidance then
extrapolates from a trained unconditional prediction. An exponential moving average of the
weights is what gets saved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ditserve.tiny.data import Scene, render_clips

from .schedule import StepPlan
from .text import BiasedCrossAttention, encode_prompts_for_training, tokenize
from .train_vae import clips_to_vae

__all__ = ["encode_latents", "flow_matching_batch", "shifted_sigmas", "train_dit"]

Log = Callable[[str], None]


def shifted_sigmas(u: Tensor, shift: float) -> Tensor:
    """The scheduler's time shift applied to uniform `u` in [0, 1]."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def flow_matching_batch(x0: Tensor, sigma: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t, target, timestep) for clean latents `x0` [B, C, F, H, W] and per-sample `sigma` [B]."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1.0 - s) * x0 + s * noise, noise - x0, sigma * 1000.0


@torch.no_grad()
def encode_latents(
    vae: torch.nn.Module, scenes: Sequence[Scene], *, n: int, batch_size: int, generator: torch.Generator,
    device: torch.device, mean: Sequence[float], std: Sequence[float],
) -> tuple[Tensor, Tensor]:
    """(normalised latents [n, C, f, h, w], index into `scenes` [n]) of `n` freshly rendered clips."""
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1, 1)
    latents, labels = [], []
    for first in range(0, n, batch_size):
        b = min(batch_size, n - first)
        idx = torch.randint(len(scenes), (b,), generator=generator)
        x = clips_to_vae(render_clips([scenes[i] for i in idx.tolist()], generator, device=device))
        latents.append((vae.encode(x).latent_dist.mean - m) / s)
        labels.append(idx)
    return torch.cat(latents), torch.cat(labels).to(device)


class _EMA:
    """Exponential moving average of a set of modules' float parameters."""

    def __init__(self, modules: Sequence[torch.nn.Module], decay: float) -> None:
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # short warm-up: early averages forget the init
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def train_dit(
    transformer: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    latents: Tensor,
    labels: Tensor,
    scenes: Sequence[Scene],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    text_lr: float,
    drop_prob: float,
    shift: float,
    ema_decay: float,
    generator: torch.Generator,
    device: torch.device,
    log: Log,
    max_seconds: float | None = None,
) -> dict[str, float]:
    """Train `transformer` and `text_encoder` in place (EMA weights at the end); returns a summary."""
    prompts = [s.prompt for s in scenes] + [""]  # last row: the empty (negative) prompt
    ids, mask = (t.to(device) for t in tokenize(tokenizer, prompts))
    empty = len(scenes)
    transformer.train()
    text_encoder.train()
    opt = torch.optim.AdamW(
        [{"params": list(transformer.parameters()), "lr": lr, "peak": lr},
         {"params": list(text_encoder.parameters()), "lr": text_lr, "peak": text_lr}],
        weight_decay=0.01,
    )
    ema = _EMA([transformer, text_encoder], ema_decay)
    cross = BiasedCrossAttention()  # the 512-row padded text, compressed exactly (see encode_prompts_for_training)
    cross.install(transformer)
    plan = StepPlan("dit", steps, 1.0, warmup=200, device=device, max_seconds=max_seconds, log=log)
    window, window_sum, last, done = 100, torch.zeros((), device=device), float("nan"), 0
    while done < plan.steps:
        for group in opt.param_groups:
            group["lr"] = group["peak"] * plan.lr(done)
        pick = torch.randint(len(latents), (batch_size,), generator=generator).to(device)
        x0 = latents[pick]
        drop = (torch.rand(batch_size, generator=generator) < drop_prob).to(device)
        which = torch.where(drop, torch.full_like(labels[pick], empty), labels[pick])
        rows, inverse = torch.unique(which, return_inverse=True)
        text, bias = encode_prompts_for_training(text_encoder, ids[rows], mask[rows])
        text, cross.bias = text[inverse], bias[inverse]
        sigma = shifted_sigmas(torch.rand(batch_size, generator=generator, dtype=torch.float64), shift)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        x_t, target, timestep = flow_matching_batch(x0, sigma.float().to(device), noise)
        pred = transformer(x_t, timestep, text, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(transformer.parameters()) + list(text_encoder.parameters()), 1.0)
        opt.step()
        ema.update(done)
        done += 1
        window_sum += loss.detach()
        stop = plan.finished(done)
        if done % window == 0 or stop:  # one host sync per window, not per step
            last = window_sum.item() / (done - (done - 1) // window * window)
            window_sum.zero_()
            plan.show(loss=last)
            log(f"dit step {done}/{plan.steps} loss {last:.4f} ({plan.elapsed():.0f}s)")
        if stop:
            break
    ema.copy_to_params()
    cross.remove(transformer)
    transformer.eval()
    text_encoder.eval()
    return {"dit_steps": done, "dit_loss": last, "dit_seconds": plan.elapsed()}
