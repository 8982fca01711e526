"""One call from a pipeline folder to a ready module: config -> meta module -> weights."""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from .folder import component_path, read_config
from .meta import instantiate_on_meta
from .weights import load_weights

__all__ = ["load_component"]

M = TypeVar("M", bound=nn.Module)


def load_component(
    root: str | Path,
    name: str,
    module_factory: Callable[[dict[str, Any]], M],
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    keep_float32: Collection[str] = (),
) -> M:
    """Build `module_factory(config)` on meta from `<root>/<name>/config.json`, load its weights, eval mode."""
    path = component_path(root, name)
    config = read_config(path)
    module = instantiate_on_meta(lambda: module_factory(config))
    load_weights(module, path, device=device, dtype=dtype, keep_float32=keep_float32)
    return module.eval()
