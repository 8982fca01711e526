"""Strict safetensors loading straight into a module built on `meta`.

Tensors are read one at a time (onto the GPU directly when the target is CUDA), cast to
the target dtype, and assigned in place of the meta parameters: the model never exists
as a float32 copy. Any mismatch between checkpoint and module is an error, reported in
full before a single tensor is read.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .errors import WeightLoadError, format_names

__all__ = ["find_checkpoint", "load_weights", "Checkpoint"]

SINGLE_FILE_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class Checkpoint:
    """Where each tensor of a component lives. `source` is the file named in messages."""

    source: Path
    files: dict[str, Path]  # key -> safetensors file holding it


def _index_files(component_dir: Path) -> list[Path]:
    return sorted(p for p in component_dir.glob(f"*{INDEX_SUFFIX}") if p.is_file())


def _read_index(index_file: Path) -> dict[str, Path]:
    try:
        data = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise WeightLoadError(f"{index_file}: cannot read the shard index: {e}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightLoadError(f"{index_file}: shard index has no 'weight_map' object (key -> shard file)")
    shards = {name: index_file.parent / name for name in set(weight_map.values())}
    missing = sorted(name for name, p in shards.items() if not p.is_file())
    if missing:
        raise WeightLoadError(
            f"{index_file}: {len(missing)} shard file(s) listed in weight_map not found in "
            f"{index_file.parent}: {format_names(missing)}"
        )
    return {key: shards[name] for key, name in weight_map.items()}


def find_checkpoint(component_dir: str | Path) -> Checkpoint:
    """Locate a component's safetensors weights: a shard index, or one single file."""
    component_dir = Path(component_dir)
    if not component_dir.is_dir():
        raise WeightLoadError(f"{component_dir}: no such component folder")
    indexes = _index_files(component_dir)
    if len(indexes) > 1:
        raise WeightLoadError(
            f"{component_dir}: more than one shard index ({format_names(p.name for p in indexes)}); "
            "keep exactly one"
        )
    if indexes:
        return Checkpoint(source=indexes[0], files=_read_index(indexes[0]))
    for name in SINGLE_FILE_NAMES:
        file = component_dir / name
        if file.is_file():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                return Checkpoint(source=file, files={key: file for key in f.keys()})
    present = sorted(p.name for p in component_dir.iterdir())
    raise WeightLoadError(
        f"{component_dir}: no safetensors weights; expected one of {', '.join(SINGLE_FILE_NAMES)} or a "
        f"sharded '*{INDEX_SUFFIX}' with its shards (found: {format_names(present) or 'nothing'})"
    )


def _expected_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's checkpoint keys (parameters + persistent buffers), tied names included."""
    return dict(module.state_dict(keep_vars=True))


def _owner(module: nn.Module, key: str) -> tuple[nn.Module, str]:
    prefix, _, leaf = key.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), leaf


def _read_device(device: torch.device) -> str:
    """safetensors can read straight onto a CUDA device; anything else goes through the CPU."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index}"
    return "cpu"


def _keep_fp32(key: str, keep_float32: Collection[str]) -> bool:
    return bool(keep_float32) and any(part in keep_float32 for part in key.split("."))


def _check(
    module: nn.Module,
    ckpt: Checkpoint,
    expected: Mapping[str, torch.Tensor],
    handles: Mapping[Path, Any],
) -> dict[str, str]:
    """Match checkpoint keys to module tensors; raise one error listing every mismatch.

    Returns, for each module tensor (by identity, so tied weights share one entry), the
    checkpoint key to read it from.
    """
    groups: dict[int, list[str]] = {}  # tied parameters appear under several names
    for name, tensor in expected.items():
        groups.setdefault(id(tensor), []).append(name)

    sources: dict[str, str] = {}
    missing: list[str] = []
    for names in groups.values():
        found = [n for n in names if n in ckpt.files]
        if found:
            for n in names:
                sources[n] = found[0]
        else:
            missing.extend(names)
    unexpected = sorted(k for k in ckpt.files if k not in expected)

    mismatched: list[str] = []
    for name, key in sorted(sources.items()):
        if name != key:
            continue  # an alias: checked under its own key
        file = ckpt.files[key]
        try:
            shape = tuple(handles[file].get_slice(key).get_shape())
        except Exception as e:  # noqa: BLE001 -- a shard index pointing at a key its shard lacks
            raise WeightLoadError(f"{file}: key {key!r} (listed in {ckpt.source.name}) cannot be read: {e}") from e
        want = tuple(expected[name].shape)
        if shape != want:
            where = "" if file == ckpt.source else f" in {file.name}"
            mismatched.append(f"{key}{where}: checkpoint {list(shape)} vs module {list(want)}")

    if missing or unexpected or mismatched:
        lines = [f"{ckpt.source}: checkpoint does not match {type(module).__name__}:"]
        if missing:
            lines.append(
                f"  {len(missing)} missing key(s) (in the module, not in the checkpoint): "
                f"{format_names(sorted(missing))}"
            )
        if unexpected:
            shown = [k if ckpt.files[k] == ckpt.source else f"{k} (in {ckpt.files[k].name})" for k in unexpected]
            lines.append(
                f"  {len(unexpected)} unexpected key(s) (in the checkpoint, not in the module): {format_names(shown)}"
            )
        if mismatched:
            lines.append(f"  {len(mismatched)} shape mismatch(es): {format_names(mismatched)}")
        raise WeightLoadError("\n".join(lines))
    return sources


def load_weights(
    module: nn.Module,
    component_dir: str | Path,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    keep_float32: Collection[str] = (),
) -> None:
    """Load a component's safetensors weights into `module` (built with `instantiate_on_meta`).

    Floating tensors are cast to `dtype`, except those whose key has a dot-separated part in
    `keep_float32` (diffusers' `_keep_in_fp32_modules`, e.g. "norm1"), which become float32;
    integer/bool tensors keep their dtype. Tied parameters stay tied. Non-persistent buffers
    (not in any checkpoint) are moved to `device` as built, or rebuilt by each submodule's
    `reset_non_persistent_buffers(device, dtype)` if it has one. Anything still on meta
    afterwards is an error.
    """
    device = torch.device(device)
    ckpt = find_checkpoint(component_dir)
    expected = _expected_tensors(module)
    read_device = _read_device(device)

    with ExitStack() as stack:
        handles = {
            file: stack.enter_context(safe_open(str(file), framework="pt", device=read_device))
            for file in sorted(set(ckpt.files.values()))
        }
        sources = _check(module, ckpt, expected, handles)

        loaded: dict[str, torch.Tensor] = {}  # checkpoint key -> tensor, shared by tied names
        for name in sorted(expected, key=lambda n: (ckpt.files[sources[n]], n)):  # file by file
            key = sources[name]
            if key not in loaded:
                tensor = handles[ckpt.files[key]].get_tensor(key)
                target = dtype
                if not tensor.is_floating_point():
                    target = tensor.dtype
                elif _keep_fp32(key, keep_float32):
                    target = torch.float32
                tensor = tensor.to(device=device, dtype=target)
                old = expected[name]
                if isinstance(old, nn.Parameter):
                    tensor = nn.Parameter(tensor, requires_grad=old.requires_grad and tensor.is_floating_point())
                loaded[key] = tensor
            owner, leaf = _owner(module, name)
            if leaf in owner._parameters:
                owner._parameters[leaf] = loaded[key]  # type: ignore[assignment]
            elif leaf in owner._buffers:
                owner._buffers[leaf] = loaded[key]
            else:
                raise WeightLoadError(
                    f"{ckpt.source}: {type(module).__name__}.state_dict() key {name!r} is neither a parameter "
                    "nor a buffer of its module; custom state_dict hooks are not supported"
                )

    _place_non_persistent_buffers(module, device, dtype)
    still_meta = [n for n, t in module.named_parameters(remove_duplicate=False) if t.is_meta]
    still_meta += [n for n, t in module.named_buffers(remove_duplicate=False) if t.is_meta]
    if still_meta:
        raise WeightLoadError(
            f"{ckpt.source}: after loading, {len(still_meta)} tensor(s) of {type(module).__name__} are still on the "
            f"meta device: {format_names(still_meta)}. Non-persistent buffers must be rebuilt by a "
            "reset_non_persistent_buffers(device, dtype) method, or build the module with "
            "instantiate_on_meta(..., include_buffers=False)"
        )


def _place_non_persistent_buffers(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Rebuild (hook) or move non-persistent buffers, which no checkpoint holds."""
    for sub in module.modules():
        reset = getattr(sub, "reset_non_persistent_buffers", None)
        if callable(reset):
            reset(device, dtype)
        for name in sub._non_persistent_buffers_set:
            buf = sub._buffers.get(name)
            if buf is not None and not buf.is_meta and buf.device != device:
                sub._buffers[name] = buf.to(device)  # keep its dtype: e.g. float64 rotary tables
