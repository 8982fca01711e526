"""The JSON side of a diffusers pipeline folder: model_index.json, component configs.

Layout (as written by `DiffusionPipeline.save_pretrained`):

    <root>/model_index.json            {"_class_name": "WanPipeline", "vae": ["diffusers", "AutoencoderKLWan"], ...}
    <root>/<component>/config.json     constructor arguments of that component
    <root>/<component>/*.safetensors   its weights (see weights.py)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import PipelineFolderError, UnknownModelError

__all__ = ["check_components", "component_path", "declared_class", "declared_components", "read_config",
           "read_model_index"]

MODEL_INDEX = "model_index.json"
_WHAT_A_FOLDER_HOLDS = (
    "a diffusers pipeline folder must contain model_index.json and one sub-folder per component "
    "(e.g. transformer/, vae/, text_encoder/, tokenizer/, scheduler/), as written by "
    "DiffusionPipeline.save_pretrained"
)


def _read_json(file: Path, what: str) -> dict[str, Any]:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineFolderError(f"{file}: {what} not found") from None
    except OSError as e:
        raise PipelineFolderError(f"{file}: cannot read {what}: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PipelineFolderError(f"{file}: {what} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise PipelineFolderError(f"{file}: {what} must hold a JSON object, got {type(data).__name__}")
    return data


def read_model_index(path: str | Path) -> dict[str, Any]:
    """Read `<path>/model_index.json`: the pipeline class and the class of each component."""
    root = Path(path)
    if not root.exists():
        raise PipelineFolderError(f"{root}: no such folder; {_WHAT_A_FOLDER_HOLDS}")
    if not root.is_dir():
        raise PipelineFolderError(f"{root}: is not a folder; {_WHAT_A_FOLDER_HOLDS}")
    if not (root / MODEL_INDEX).is_file():
        raise PipelineFolderError(f"{root}: has no {MODEL_INDEX}; {_WHAT_A_FOLDER_HOLDS}")
    return _read_json(root / MODEL_INDEX, MODEL_INDEX)


def declared_components(model_index: Mapping[str, Any]) -> list[str]:
    """Names of the components a model_index declares (entries like ["diffusers", "X"]; nulls skipped)."""
    return sorted(
        k
        for k, v in model_index.items()
        if not k.startswith("_") and isinstance(v, (list, tuple)) and len(v) == 2 and v[1] is not None
    )


def declared_class(entry: Any) -> Any:
    """model_index.json's `["library", "Class"]` -> "Class" (None for an absent component)."""
    if isinstance(entry, list | tuple):
        return entry[1] if len(entry) == 2 else None
    return entry


def check_components(root: Path, model_index: Mapping[str, Any], expected: Mapping[str, str], pipeline: str) -> None:
    """Refuse a folder whose components are not the classes `pipeline` builds, before anything loads."""
    for name, cls in expected.items():
        declared = declared_class(model_index.get(name))
        if declared != cls:
            raise UnknownModelError(f"{root / MODEL_INDEX}: component {name!r} is {declared!r}; {pipeline} needs {cls!r}")


def component_path(root: str | Path, name: str) -> Path:
    """`<root>/<name>`, checked to be a component folder of a pipeline folder."""
    root = Path(root)
    index = read_model_index(root)
    path = root / name
    if not path.is_dir():
        declared = declared_components(index)
        raise PipelineFolderError(
            f"{path}: component folder {name!r} not found; "
            f"{root / MODEL_INDEX} declares: {', '.join(declared) or '(none)'}"
        )
    return path


def read_config(component_dir: str | Path, filename: str = "config.json") -> dict[str, Any]:
    """Read a component's config (`config.json`; schedulers use `scheduler_config.json`)."""
    return _read_json(Path(component_dir) / filename, filename)

