"""Stage and per-step timing that never stalls the denoising loop.

Stage boundaries (text, denoise, decode) synchronise the device once each: they are
rare and we want wall time. Inside the loop, CUDA steps are timed with events recorded
on the stream and read after the loop, so the CPU keeps queueing kernels ahead of the GPU.
"""

from __future__ import annotations

import time

import torch

__all__ = ["synchronize", "StepTimer"]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """`start()` once, `mark()` after each step, `per_step_s()` after the loop."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._marks: list[torch.cuda.Event | float] = []

    def _now(self) -> torch.cuda.Event | float:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._marks = [self._now()]

    def copy(self) -> StepTimer:
        """A timer with the marks so far (requests prepared together share their first interval)."""
        twin = StepTimer.__new__(StepTimer)
        twin._cuda, twin._marks = self._cuda, list(self._marks)
        return twin

    def mark(self) -> None:
        self._marks.append(self._now())

    def per_step_s(self) -> list[float]:
        """Seconds per step; on CUDA this waits for the last step to finish."""
        marks = self._marks
        if len(marks) < 2:
            return []
        if self._cuda:
            marks[-1].synchronize()  # type: ignore[union-attr]
            return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]  # type: ignore[union-attr]
        return [b - a for a, b in zip(marks, marks[1:])]  # type: ignore[operator]
