"""ditserve: a fast inference and serving runtime for diffusion transformers."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("ditserve")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+src"

if TYPE_CHECKING:
    from ditserve.pipelines import Pipeline

__all__ = ["Pipeline", "__version__"]


def __getattr__(name: str) -> Any:
    """`ditserve.Pipeline` imports torch and the pipelines on first use, so `import ditserve` stays light."""
    if name == "Pipeline":
        from ditserve.pipelines import Pipeline

        return Pipeline
    raise AttributeError(f"module 'ditserve' has no attribute {name!r}")
