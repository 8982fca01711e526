"""Build a module without allocating its weights, so loading never holds two copies.

A module built here has its parameters on the `meta` device (shapes and dtypes, no
storage); `load_weights` then assigns the checkpoint tensors in place of them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn

__all__ = ["instantiate_on_meta"]

M = TypeVar("M", bound=nn.Module)

_PATCH_LOCK = threading.Lock()


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Move each parameter to meta as it is registered; buffers stay where they are made.

    This patches `nn.Module.register_parameter` for the duration (held under a lock), so a
    module built on another thread at the same moment would also get meta parameters.
    """
    original = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)

    with _PATCH_LOCK:
        nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
        try:
            yield
        finally:
            nn.Module.register_parameter = original  # type: ignore[method-assign]


def instantiate_on_meta(factory: Callable[[], M], *, include_buffers: bool = False) -> M:
    """Call `factory()` with parameters created on the `meta` device.

    include_buffers=False (default): buffers are built for real, on the CPU, because many
    modules compute non-persistent buffers in `__init__` (rotary tables, e.g. diffusers'
    `WanRotaryPosEmbed`) that no checkpoint holds; `load_weights` moves them to the target
    device. Parameters are created on the CPU uninitialised (`torch.empty`) and moved to meta
    as soon as they are registered, so their initialisation costs nothing.

    include_buffers=True: everything is built under `torch.device("meta")`; the module must
    then rebuild its non-persistent buffers in a `reset_non_persistent_buffers(device, dtype)`
    method, which `load_weights` calls.
    """
    if include_buffers:
        with torch.device("meta"):
            return factory()
    with _parameters_on_meta():
        return factory()
