"""Which family class runs a folder: model_index.json's `_class_name` -> "module:Class".

Adding a family is one line here (plus its own modules). The class is imported only when a
folder names it, so listing the registry imports no model code.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ditserve.loading import UnknownModelError

__all__ = ["FAMILIES", "REQUEST_DEFAULTS_FILE", "family_class_for", "folder_request_defaults"]

FAMILIES: Mapping[str, str] = MappingProxyType({
    "Cosmos3OmniPipeline": "ditserve.pipelines.cosmos3:Cosmos3Pipeline",
    "FluxPipeline": "ditserve.pipelines.flux:FluxPipeline",
    "WanPipeline": "ditserve.pipelines.wan:WanPipeline",
    "WanImageToVideoPipeline": "ditserve.pipelines.wan:WanPipeline",
})

# An optional file in a pipeline folder: request defaults that override the family's
# (e.g. the embedded tiny model's own size, frames, steps and guidance). Not a diffusers file.
REQUEST_DEFAULTS_FILE = "request_defaults.json"


def family_class_for(model_index: Mapping[str, Any], source: str | os.PathLike[str]) -> type:
    """The ditserve pipeline class (a `ditserve.pipelines.Pipeline` subclass) for a model_index.json
    (`source` names it in errors)."""
    name = model_index.get("_class_name")
    if name not in FAMILIES:
        shown = "no _class_name" if name is None else f"pipeline class {name!r}"
        raise UnknownModelError(
            f"{source}: {shown} is not supported; supported pipelines: {', '.join(sorted(FAMILIES))}"
        )
    module, _, attr = FAMILIES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def folder_request_defaults(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The folder's `request_defaults.json` as a dict ({} when there is none)."""
    path = Path(root) / REQUEST_DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UnknownModelError(f"{path}: not a readable JSON file: {e}") from None
    if not isinstance(data, dict):
        raise UnknownModelError(f"{path}: must hold a JSON object of request defaults, got {type(data).__name__}")
    return data
