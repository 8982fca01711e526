"""Denoise stage: the scheduler loop and classifier-free guidance, shared by every family.

The loop never reads a value back from the device (no `.item()`, no `.cpu()`): timesteps
are iterated as device tensors, the scheduler is told its begin index (so it does not
search for the step with a device-to-host copy), and `callback` / `cancel` get Python ints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from ditserve.pipelines.errors import GenerationCancelled
from ditserve.pipelines.timing import StepTimer

__all__ = ["CancelToken", "Predict", "StepCallback", "combine_guidance", "denoise", "guided_predictor", "start_schedule"]

# (latents, timestep as a 0-d tensor) -> the model's prediction for the scheduler
Predict = Callable[[Tensor, Tensor], Tensor]
# (index of the step just finished, 0-based; total steps)
StepCallback = Callable[[int, int], None]
# (latents [B, ...], timesteps [B], text [B, L, D]) -> prediction [B, ...]
ModelCall = Callable[[Tensor, Tensor, Tensor], Tensor]


class CancelToken(Protocol):
    """Anything with `is_set()`, e.g. a `threading.Event`."""

    def is_set(self) -> bool: ...


def guided_predictor(model: ModelCall, cond: Tensor, uncond: Tensor | None, guidance_scale: float) -> Predict:
    """Classifier-free guidance as `uncond + g * (cond - uncond)` (diffusers' formula).

    With `uncond` the two branches run as ONE forward of batch 2B (latents repeated, text
    `[cond; uncond]`): same math as two forwards, one launch sequence, larger GEMMs.
    With `uncond=None` (guidance off) only the conditional branch runs.
    """
    if uncond is None:
        return lambda x, t: model(x, t.expand(x.shape[0]), cond)
    text = torch.cat([cond, uncond])

    def predict(x: Tensor, t: Tensor) -> Tensor:
        pred_cond, pred_uncond = model(torch.cat([x, x]), t.expand(2 * x.shape[0]), text).chunk(2)
        return combine_guidance(pred_cond, pred_uncond, guidance_scale)

    return predict


def combine_guidance(pred_cond: Tensor, pred_uncond: Tensor, guidance_scale: float) -> Tensor:
    """`uncond + g * (cond - uncond)`: one formula for the single-request and batched paths."""
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond)


def start_schedule(scheduler: Any, num_inference_steps: int, device: torch.device) -> Tensor:
    """Set a fresh scheduler's timesteps on `device` and its begin index; return the timesteps.

    The begin index spares the scheduler a device-to-host search for the current step. Shared
    by `denoise` and the batching engine, so a request steps the same way alone or batched.
    """
    scheduler.set_timesteps(num_inference_steps, device=device)
    scheduler.set_begin_index(0)
    return scheduler.timesteps


def denoise(
    scheduler: Any,
    latents: Tensor,
    predict: Predict,
    *,
    num_inference_steps: int,
    device: torch.device,
    callback: StepCallback | None = None,
    cancel: CancelToken | None = None,
    timer: StepTimer | None = None,
) -> Tensor:
    """Run `scheduler` (a fresh diffusers scheduler) from `latents` to the clean latents.

    `cancel` is checked before every step (raising `GenerationCancelled`); `callback(i, total)`
    runs after step i. The latents stay in their dtype (float32, like diffusers); `predict`
    casts to the model's dtype itself.
    """
    timesteps = start_schedule(scheduler, num_inference_steps, device)
    total = len(timesteps)
    if timer is not None:
        timer.start()
    for i, t in enumerate(timesteps):
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled(i, total)
        latents = scheduler.step(predict(latents, t), t, latents, return_dict=False)[0]
        if timer is not None:
            timer.mark()
        if callback is not None:
            callback(i, total)
    return latents
