"""Scheduler stage: build the checkpoint's own diffusers scheduler from scheduler_config.json.

Only the flow-matching schedulers the supported checkpoints ship (Wan: UniPC on flow sigmas or
Euler; Flux: Euler with dynamic shifting) are accepted; the shift (UniPC's
`flow_shift`, Euler's `shift`) is whatever the config says. A scheduler keeps per-run state
(step index, solver history), so a pipeline builds a fresh one for every generation
instead of sharing one between concurrent requests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ditserve.loading import UnknownModelError

__all__ = ["SUPPORTED_SCHEDULERS", "scheduler_factory"]

SUPPORTED_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler")


def _known() -> dict[str, type]:
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    return {"FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler,
            "UniPCMultistepScheduler": UniPCMultistepScheduler}


def scheduler_factory(config: Mapping[str, Any], *, source: str | Path | None = None) -> Callable[[], Any]:
    """A zero-argument callable returning a new scheduler configured like `config`.

    Raises `UnknownModelError` listing the supported classes when `_class_name` is another one.
    """
    where = f"{source}: " if source is not None else ""
    name = config.get("_class_name")
    known = _known()
    if name not in known:
        raise UnknownModelError(
            f"{where}scheduler class {name!r} is not supported; supported schedulers: {', '.join(SUPPORTED_SCHEDULERS)}"
        )
    cls = known[name]
    flow = config.get("use_flow_sigmas", False) and config.get("prediction_type") == "flow_prediction"
    if name == "UniPCMultistepScheduler" and not flow:
        raise UnknownModelError(
            f"{where}UniPCMultistepScheduler without use_flow_sigmas=true is not a flow-matching scheduler; "
            "Wan checkpoints ship it with use_flow_sigmas=true and prediction_type='flow_prediction'"
        )
    frozen = dict(config)
    cls.from_config(frozen)  # fail now, at load time, on a config the class rejects
    return lambda: cls.from_config(frozen)
