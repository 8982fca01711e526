"""Errors a pipeline raises besides the request and loading errors (engine, loading)."""

from __future__ import annotations

__all__ = ["GenerationCancelled", "PipelineConfigError"]


class GenerationCancelled(Exception):
    """`cancel.is_set()` was true before a denoising step; nothing was decoded or written."""

    def __init__(self, step: int, total_steps: int) -> None:
        super().__init__(f"generation cancelled before denoising step {step + 1} of {total_steps}")
        self.step = step
        self.total_steps = total_steps


class PipelineConfigError(ValueError):
    """A loading option (device, dtype) or a pipeline folder's setup that ditserve cannot run."""
