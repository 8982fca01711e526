"""ditserve: a fast inference and serving runtime for diffusion transformers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ditserve")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+src"

__all__ = ["__version__"]
