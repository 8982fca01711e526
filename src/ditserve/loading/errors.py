"""Errors raised while reading a diffusers-format pipeline folder.

All are ValueErrors (the input is wrong, not the code), each with a message that names
the file or folder at fault and says what was expected, so a user can fix the folder.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["PipelineFolderError", "WeightLoadError", "UnknownModelError", "format_names"]


class PipelineFolderError(ValueError):
    """The folder (or one of its JSON files) is not a usable diffusers pipeline folder."""


class WeightLoadError(ValueError):
    """The safetensors checkpoint does not match the module it is loaded into."""


class UnknownModelError(ValueError):
    """A config names a model class that ditserve does not implement."""


def format_names(names: Iterable[str], limit: int = 10) -> str:
    """`a, b, c` or `a, b, ... (+N more)`: error messages stay readable for huge key lists."""
    names = list(names)
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f", ... (+{len(names) - limit} more)"
    return shown
