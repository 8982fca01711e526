"""FlashAttention-4 (`pip install ditserve[fa4]`): CuTe-DSL kernels for Hopper and Blackwell.

Dense and packed (varlen) in FlashAttention's own `[.., seq, heads, dim]` layout, GQA native.
The package is imported on first use only (it JIT-compiles and takes seconds to import).
"""

from __future__ import annotations

import importlib.util
from functools import cached_property

import torch

from ditserve.attention.backends.base import AttentionBackend, Capabilities
from ditserve.attention.metadata import AttentionMetadata


class FlashAttention4Backend(AttentionBackend):
    name = "fa4"
    capabilities = Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        head_dims=(8, 256),
        head_dim_multiple=8,
        packed=True,
        returns_lse=True,
    )

    @cached_property
    def _import_error(self) -> str | None:
        if importlib.util.find_spec("flash_attn") is None:
            return "package flash-attn-4 is not installed (pip install 'ditserve[fa4]')"
        try:
            import flash_attn.cute  # noqa: F401  (seconds: loads the CuTe DSL)
        except Exception as err:  # noqa: BLE001 - a broken optional install must not break ditserve
            return f"package flash-attn-4 failed to import: {type(err).__name__}: {err}"
        return None

    def unavailable_reason(self) -> str | None:
        return self._import_error

    def device_reason(self, device: torch.device) -> str | None:
        major = torch.cuda.get_device_capability(device)[0]
        if major not in (9, 10, 11):
            return f"FlashAttention-4 needs Hopper (sm90) or Blackwell (sm100/sm110), this GPU is sm{major}x"
        return None

    def why_not(self, call, device):
        reason = super().why_not(call, device)
        if reason is None and torch.cuda.get_device_capability(device)[0] >= 10 and max(call.head_dim, call.head_dim_v) > 128 and call.head_dim != 256:
            return "FlashAttention-4 on Blackwell takes head_dim <= 128 (or 256)"
        return reason

    @cached_property
    def _interface(self):
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

        return flash_attn_func, flash_attn_varlen_func

    def forward(self, query, key, value, metadata: AttentionMetadata, scale: float, return_lse: bool = False):
        dense_fn, varlen_fn = self._interface
        if metadata.packed:
            out = varlen_fn(
                query,
                key,
                value,
                cu_seqlens_q=metadata.cu_seqlens_q,
                cu_seqlens_k=metadata.cu_seqlens_k,
                max_seqlen_q=metadata.max_seq_len_q,
                max_seqlen_k=metadata.max_seq_len_k,
                softmax_scale=scale,
                causal=metadata.causal,
                return_lse=return_lse,
            )
        else:
            out = dense_fn(query, key, value, softmax_scale=scale, causal=metadata.causal, return_lse=return_lse)
        if not return_lse:
            return out[0] if isinstance(out, tuple) else out
        # FlashAttention keeps the log-sum-exp heads-first ([B, H, S] / [H, total]); ours is [B, S, H] / [total, H].
        return out[0], out[1].transpose(-1, -2)
