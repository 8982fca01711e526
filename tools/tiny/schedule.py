"""A training stage's step count and learning-rate schedule, optionally fitted to a time budget.

With a budget, the stage times steps 10..40 and, if all `steps` would not fit, lowers
`steps` once, so the cosine decay still reaches zero at the last step actually run (a
stage cut off mid-schedule would end at a high learning rate). The steps actually run are
recorded; passing them back as `steps` without a budget replays the same schedule. Each
stage shows a progress bar (tqdm, on stderr) with its latest loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

__all__ = ["StepPlan"]

_TIME_FROM, _TIME_TO = 10, 40  # steps timed to estimate the per-step cost (after warm-up effects)


class StepPlan:
    """Steps and learning rate of one stage: `lr(step)`, then `finished(done)` after each step."""

    def __init__(self, name: str, steps: int, peak_lr: float, warmup: int, *, device: torch.device,
                 max_seconds: float | None, log: Callable[[str], None], progress: bool = True) -> None:
        if steps < 1:
            raise ValueError(f"{name}: steps must be at least 1, got {steps}")
        self.name, self.steps, self.peak_lr, self.device = name, steps, peak_lr, device
        self.warmup = max(1, min(warmup, steps // 10 + 1))
        self.max_seconds, self.log = max_seconds, log
        self.start = time.perf_counter()
        self._timed_from = 0.0
        self.bar = tqdm(total=steps, desc=name, unit="step", disable=not progress, mininterval=1.0)

    def show(self, **values: float) -> None:
        """Put the latest losses on the progress bar."""
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def lr(self, step: int) -> float:
        """Linear warm-up to the peak, then cosine decay to zero at the last step."""
        if step < self.warmup:
            return self.peak_lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.elapsed()

    def finished(self, done: int) -> bool:
        """Call after each step with the number of steps done; True when the stage should stop."""
        self.bar.update(1)
        if self.max_seconds is not None:
            if done == _TIME_FROM:
                self._timed_from = self._now()
            elif done == _TIME_TO and self.steps > _TIME_TO:
                now = self._now()
                per_step = (now - self._timed_from) / (_TIME_TO - _TIME_FROM)
                fits = _TIME_TO + int((self.max_seconds - now) / per_step)
                if fits < self.steps:
                    self.log(f"{self.name}: {per_step * 1e3:.0f} ms/step; {self.steps} steps do not fit in "
                             f"{self.max_seconds:.0f}s, running {max(fits, _TIME_TO + 1)}")
                    self.steps = max(fits, _TIME_TO + 1)
            if self.elapsed() > self.max_seconds * 1.1:  # estimate was off: stop rather than overrun
                self.log(f"{self.name}: time budget exceeded, stopping after {done} steps")
                self.steps = done
        if self.bar.total != self.steps:
            self.bar.total = self.steps
        if done >= self.steps:
            self.bar.close()
            return True
        return False
