"""Turning user-facing device/dtype options ("cuda", "bf16", None) into torch objects."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch

from ditserve.pipelines.errors import PipelineConfigError

__all__ = ["DTYPE_NAMES", "resolve_device", "resolve_dtype", "resolve_load_options", "resolve_quantize",
           "transformers_dtype_kwargs"]

DTYPE_NAMES: Mapping[str, torch.dtype] = MappingProxyType(
    {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> cuda if available else cpu; a CUDA device that is not there is an error now, not later."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise PipelineConfigError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1'): {e}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise PipelineConfigError(f"device {str(device)!r} requested but CUDA is not available on this machine")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise PipelineConfigError(
                f"device {str(device)!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None -> bfloat16 on CUDA, float32 elsewhere; names as in `DTYPE_NAMES`."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPE_NAMES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.lower()]
    raise PipelineConfigError(f"dtype must be one of {', '.join(DTYPE_NAMES)} (or that torch.dtype), got {dtype!r}")


def resolve_load_options(device: str | torch.device | None, dtype: str | torch.dtype | None,
                         attention_backend: str | None) -> tuple[torch.device, torch.dtype, str]:
    """`from_pretrained`'s device, dtype and attention backend, resolved; each bad one is a
    `PipelineConfigError` now, before anything loads."""
    from ditserve.attention.selector import check_pinned_backend, resolve_backend_name

    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    try:
        backend = resolve_backend_name(attention_backend)
        check_pinned_backend(backend, resolved_device, resolved_dtype)
    except ValueError as e:
        raise PipelineConfigError(str(e)) from None
    return resolved_device, resolved_dtype, backend


def transformers_dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """`from_pretrained`'s dtype argument for transformers models: renamed `torch_dtype` -> `dtype` in 4.56."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


def resolve_quantize(quantize: str | None, device: str | torch.device | None) -> str | None:
    """`quantize` checked against the accepted modes and the device (FP8 needs FP8 tensor cores):
    None / "none" -> None; a `PipelineConfigError` now, before anything loads."""
    from ditserve.models.fp8 import QUANTIZE_MODES, fp8_unsupported_reason

    if quantize is None or (isinstance(quantize, str) and quantize.lower() == "none"):
        return None
    if not isinstance(quantize, str) or quantize.lower() not in QUANTIZE_MODES:
        raise PipelineConfigError(f"quantize must be one of {', '.join(('none', *QUANTIZE_MODES))}, got {quantize!r}")
    reason = fp8_unsupported_reason(resolve_device(device))
    if reason is not None:
        raise PipelineConfigError(f"quantize={quantize!r}: {reason}")
    return quantize.lower()
