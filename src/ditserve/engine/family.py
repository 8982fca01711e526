"""What the engine needs from a model family: the `Family` protocol and the data it exchanges.

The engine knows no model. For each request it asks the family to `prepare` it (encode the
text, draw the noise, start the scheduler, say how the request's samples combine), then at
every step hands the family the samples that advance (`Sample`: latents, timestep,
conditioning) and gets one prediction per sample back. How the family turns samples into
forwards (one packed forward, one per expert, per-token timesteps, a guidance embedding) is
its own business. The engine combines each request's predictions with its `GuidancePlan`
and steps the request's own scheduler. `Pipeline.generate` is this engine with one request,
so the Python API, the CLI and the server share one denoising loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ditserve.engine.request import GenerationRequest, RequestSpec

__all__ = ["CancelToken", "Family", "GuidancePlan", "Prepared", "Sample", "StepCallback"]

# (index of the step just finished, 0-based; total steps)
StepCallback = Callable[[int, int], None]


class CancelToken(Protocol):
    """Anything with `is_set()`, e.g. a `threading.Event`."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class GuidancePlan:
    """How a request's samples combine into the prediction its scheduler steps with.

    samples == 1: the prediction as it is (no guidance, or guidance the model takes as an input,
    like Flux.1-dev's embedding). samples == 2: classifier-free guidance over (cond, uncond),
    `uncond + scale * (cond - uncond)` (diffusers' formula) with `scales[step]`, so a family can
    change the scale per step (Wan2.2-A14B: one scale per expert).
    """

    samples: int
    scales: tuple[float, ...] = ()

    @classmethod
    def single(cls) -> GuidancePlan:
        return cls(1)

    @classmethod
    def classifier_free(cls, scales: Sequence[float]) -> GuidancePlan:
        return cls(2, tuple(float(s) for s in scales))

    def __post_init__(self) -> None:
        if self.samples not in (1, 2):
            raise ValueError(f"a guidance plan has 1 or 2 samples, got {self.samples}")
        if self.samples == 2 and not self.scales:
            raise ValueError("classifier-free guidance needs a scale per step")

    def combine(self, predictions: Sequence[Tensor], step: int) -> Tensor:
        if self.samples == 1:
            return predictions[0]
        cond, uncond = predictions
        return uncond + self.scales[step] * (cond - uncond)


@dataclass(eq=False)
class Prepared:
    """A request ready to denoise; the engine owns it from here.

    latents: the seeded starting noise `[1, C, ...]` (float32); scheduler: a fresh diffusers
    scheduler, started; timesteps: its timesteps; conditions: one per sample (the family's own
    conditioning, e.g. text embeddings for cond and uncond), `len == guidance.samples`;
    state: anything else the family keeps per request (e.g. an image's latents). cache: the
    engine's step cache of this request (`ditserve.engine.step_cache`), made on its first step.
    """

    latents: Tensor
    scheduler: Any
    timesteps: Tensor
    conditions: tuple[Any, ...]
    guidance: GuidancePlan
    state: Any = None
    cache: Any = None

    def __post_init__(self) -> None:
        if len(self.conditions) != self.guidance.samples:
            raise ValueError(f"{len(self.conditions)} conditions for a plan of {self.guidance.samples} samples")


@dataclass(frozen=True)
class Sample:
    """One sample of one request at one step, as the family's `predict` receives it."""

    latents: Tensor  # the request's current latents [1, C, ...] (float32)
    timestep: Tensor  # 0-d, on the device
    step: int
    condition: Any  # Prepared.conditions[i]
    prepared: Prepared


class Family(Protocol):
    """What a loaded pipeline provides to the engine (every `ditserve.Pipeline` does)."""

    device: torch.device

    @property
    def request_spec(self) -> RequestSpec:
        """The family's request parameters (validation happens before submit)."""

    def tokens_per_step(self, request: GenerationRequest) -> int:
        """DiT tokens this request adds to one step, all its samples together (the budget's unit)."""

    def default_max_batch_tokens(self) -> int:
        """The token budget per step when none is given (see `ditserve.engine.budget`)."""

    def prepare_batch(self, requests: Sequence[GenerationRequest]) -> list[Prepared]:
        """For each request: encode the conditioning, draw the noise, start a fresh scheduler. Requests
        admitted together come together, so their text encoding is one batch."""

    def predict(self, samples: Sequence[Sample], interrupt: Callable[[], bool] | None = None) -> list[Tensor]:
        """One step for samples of any requests and sizes: one prediction per sample, in order.

        `interrupt()` may be asked between blocks; when it returns True the family raises
        `StepInterrupted` (every request in the step was cancelled: finishing it helps nobody)."""

    def final_latents(self, prepared: Prepared, latents: Tensor) -> Tensor:
        """The latents to decode once the last step is done (e.g. with a given first frame put back)."""

    def decode_batch(self, latents: Tensor) -> list[np.ndarray]:
        """Clean latents `[B, C, ...]` (one shape) -> B frame arrays (F, H, W, 3) in [0, 1] on the host."""
