"""Errors a pipeline raises besides the request, engine and loading errors."""

from __future__ import annotations

__all__ = ["PipelineConfigError"]


class PipelineConfigError(ValueError):
    """A loading option (device, dtype) or a pipeline folder's setup that ditserve cannot run."""
