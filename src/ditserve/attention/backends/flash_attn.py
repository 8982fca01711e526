"""The `flash-attn` package: FA3 (`flash_attn_interface`, Hopper) when present, else FA2.

Dense and packed in FlashAttention's `[.., seq, heads, dim]` layout, GQA native.
"""

from __future__ import annotations

import importlib
from functools import cached_property
from types import ModuleType

import torch

from ditserve.attention.backends.base import AttentionBackend, Capabilities
from ditserve.attention.metadata import AttentionMetadata


def _import_flash_module() -> tuple[ModuleType | None, str]:
    """FA3's module if importable, else FA2's; FA4 alone also installs `flash_attn`, so check the API."""
    for module_name, version in (("flash_attn_interface", "FA3"), ("flash_attn", "FA2")):
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - a broken optional install must not break ditserve
            continue
        if hasattr(module, "flash_attn_func") and hasattr(module, "flash_attn_varlen_func"):
            return module, version
    return None, ""


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"
    capabilities = Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        head_dims=(8, 256),
        head_dim_multiple=8,
        packed=True,
    )

    @cached_property
    def _module(self) -> tuple[ModuleType | None, str]:
        return _import_flash_module()

    def unavailable_reason(self) -> str | None:
        return None if self._module[0] is not None else "package flash-attn (FA2/FA3) is not installed"

    def device_reason(self, device: torch.device) -> str | None:
        major = torch.cuda.get_device_capability(device)[0]
        if self._module[1] == "FA3" and major != 9:
            return f"FA3 needs Hopper (sm90), this GPU is sm{major}x"
        if major < 8:
            return f"FlashAttention needs compute capability >= 8.0, this GPU is sm{major}x"
        return None

    def forward(self, query, key, value, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        module = self._module[0]
        if metadata.packed:
            out = module.flash_attn_varlen_func(
                query,
                key,
                value,
                metadata.cu_seqlens_q,
                metadata.cu_seqlens_k,
                metadata.max_seq_len_q,
                metadata.max_seq_len_k,
                softmax_scale=scale,
                causal=metadata.causal,
            )
        else:
            out = module.flash_attn_func(query, key, value, softmax_scale=scale, causal=metadata.causal)
        return out[0] if isinstance(out, tuple) else out
