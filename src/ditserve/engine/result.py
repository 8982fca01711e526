"""What a generation returns: frames in [0, 1], how long each stage took, and the seed."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["GenerationOutput"]


@dataclass(frozen=True)
class GenerationOutput:
    """`frames`: float32 (num_frames, height, width, 3) in [0, 1].

    `timings` (seconds): text_encode_s, denoise_s, per_step_s (list, one per step),
    step_mean_s, decode_s, total_s. Measured with device synchronisation at stage
    boundaries only; per-step times on CUDA come from events, so the loop never waits.
    """

    frames: np.ndarray
    seed: int
    timings: dict[str, float | list[float]] = field(default_factory=dict)

    def save(self, path: str | os.PathLike[str], fps: float = 16) -> Path:
        """Write .mp4 / .gif / .png (first frame) atomically; see `ditserve.output`."""
        from ditserve.output import write_frames

        return write_frames(path, self.frames, fps=fps)
