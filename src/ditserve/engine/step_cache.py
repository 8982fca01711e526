"""Step caching: a request reuses its previous predictions on steps where they would change little.

Adjacent denoising steps of a diffusion transformer predict nearly the same thing through most of
the schedule; skipping the DiT on such steps trades a measured amount of quality for time. A
skipped step takes the last computed prediction carried forward along the change between the
last two (first-order extrapolation, as TaylorSeer forecasts features; on the embedded model it
keeps 7-13 dB more PSNR than reusing the last prediction as it is, at the same steps). The
decision is per request (each has its own schedule and content) and is taken in `advance`, the
step function every rank runs, from the request's own predictions only, so it needs nothing from
the family and every rank takes the same decision.

Two policies (`--cache`):
- `AdaptiveStepCache(threshold)` (the default method): the change a reused step misses is
  estimated from the relative L1 change between the request's last two computed predictions,
  per step between them; steps are reused while the change accumulated since the last computed
  prediction stays at most `threshold`. Like FBCache's and TeaCache's accumulated-distance rules,
  but measured on the model's output, which every family has.
- `UniformStepCache(interval)` (the alternative it is measured against): compute every
  `interval`-th step, reuse the others, whatever the content.

Both always compute the first `warmup` steps (the output changes fastest there, and the adaptive
rule needs two predictions) and the last `final` ones (fine detail is settled there).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["AdaptiveStepCache", "CacheState", "StepCachePolicy", "UniformStepCache", "parse_step_cache"]


class CacheState:
    """One request's cache: its last computed prediction and what the policy needs to decide."""

    def __init__(self, policy: StepCachePolicy, total: int) -> None:
        self.policy = policy
        self.total = total
        self.last: Tensor | None = None
        self.last_step = -1
        self.slope: Tensor | None = None  # change per step between the last two computed predictions
        self.rate: float | None = None  # relative change per step, from the last two computed predictions
        self.missed = 0.0  # change estimated to have accumulated over the steps reused since `last`
        self.reused = 0

    def reuse(self, step: int) -> bool:
        """Whether `step` takes the last prediction instead of running the DiT."""
        policy = self.policy
        if self.last is None or step < policy.warmup or step >= self.total - policy.final:
            return False
        return policy.reuses(self, step)

    def record(self, prediction: Tensor, step: int, reused: bool) -> None:
        """After the step: a computed prediction becomes the one to reuse."""
        if reused:
            self.reused += 1
            self.missed += self.rate or 0.0
            return
        if self.last is not None:
            delta, span = prediction - self.last, step - self.last_step
            self.rate = float(delta.abs().mean() / self.last.abs().mean().clamp_min(1e-12)) / span
            self.slope = delta / span
        self.last, self.last_step, self.missed = prediction, step, 0.0

    def forecast(self, step: int) -> Tensor:
        """The prediction a reused step takes: the last computed one, carried forward along the
        change between the last two (first order)."""
        if self.slope is None:
            return self.last
        return self.last + self.slope * (step - self.last_step)


@dataclass(frozen=True)
class StepCachePolicy:
    """What every policy shares: steps always computed at the start (`warmup`) and end (`final`)."""

    warmup: int = 2
    final: int = 1

    def __post_init__(self) -> None:
        if self.warmup < 2 or self.final < 0:
            raise ValueError(f"step cache: warmup must be >= 2 and final >= 0, got {self.warmup} and {self.final}")

    def new_state(self, total: int) -> CacheState:
        return CacheState(self, total)

    def reuses(self, state: CacheState, step: int) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class AdaptiveStepCache(StepCachePolicy):
    """Reuse while the estimated accumulated relative change stays at most `threshold` (e.g. 0.1)."""

    threshold: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.threshold < 10:
            raise ValueError(f"step cache threshold must be in (0, 10), got {self.threshold}")

    def reuses(self, state: CacheState, step: int) -> bool:
        return state.rate is not None and state.missed + state.rate <= self.threshold


@dataclass(frozen=True)
class UniformStepCache(StepCachePolicy):
    """Compute every `interval`-th step after the warm-up, reuse the others."""

    interval: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.interval < 2:
            raise ValueError(f"step cache interval must be >= 2, got {self.interval}")

    def reuses(self, state: CacheState, step: int) -> bool:
        return (step - self.warmup) % self.interval != 0


def parse_step_cache(text: str | float | None) -> StepCachePolicy | None:
    """`--cache` / `cache=`: None or "off" -> None; a number -> `AdaptiveStepCache(threshold)`;
    "uniform:N" -> `UniformStepCache(N)`. ValueError naming the accepted forms otherwise."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "off", "none")):
        return None
    forms = "a threshold such as 0.1 (adaptive reuse), 'uniform:N' (compute every N-th step) or 'off'"
    try:
        if isinstance(text, str) and text.strip().lower().startswith("uniform:"):
            return UniformStepCache(interval=int(text.split(":", 1)[1]))
        return AdaptiveStepCache(threshold=float(text))
    except ValueError as e:
        raise ValueError(f"cache: {text!r} is not valid ({e}); give {forms}") from None
