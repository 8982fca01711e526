"""PyTorch `scaled_dot_product_attention`, either letting torch choose or pinned to one kernel.

A pinned kernel is called as its own aten op (`aten._scaled_dot_product_cudnn_attention`, ...),
which also hands back the log-sum-exp that ring attention merges by (flash, cuDNN,
memory-efficient), not through `F.scaled_dot_product_attention` inside `sdpa_kernel(...)`: that context manager
flips process-wide flags, so while one thread held it, SDPA calls on every other thread (the
VAE decoding on its own thread, say) found their kernels switched off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from ditserve.attention.backends.base import AttentionBackend, AttentionBackendError, Capabilities
from ditserve.attention.metadata import AttentionMetadata

_ALL_FLOATS = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})
_HALF_FLOATS = frozenset({torch.float16, torch.bfloat16})
_ANY_DEVICE = frozenset({"cpu", "cuda", "mps", "xpu"})

# kernel name -> (torch's SDPBackend or None for torch's own choice, capabilities, takes enable_gqa)
_KERNELS: dict[str, tuple[SDPBackend | None, Capabilities, bool]] = {
    "auto": (None, Capabilities(devices=_ANY_DEVICE, dtypes=_ALL_FLOATS, masks=True), True),
    "math": (SDPBackend.MATH, Capabilities(devices=_ANY_DEVICE, dtypes=_ALL_FLOATS, masks=True), True),
    "flash": (SDPBackend.FLASH_ATTENTION, Capabilities(devices=frozenset({"cuda"}), dtypes=_HALF_FLOATS, head_dims=(8, 256), head_dim_multiple=8, returns_lse=True), False),
    "cudnn": (SDPBackend.CUDNN_ATTENTION, Capabilities(devices=frozenset({"cuda"}), dtypes=_HALF_FLOATS, head_dims=(8, 256), head_dim_multiple=8, returns_lse=True), False),
    "efficient": (
        SDPBackend.EFFICIENT_ATTENTION,
        Capabilities(devices=frozenset({"cuda"}), dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}), head_dims=(8, 512), head_dim_multiple=8, masks=True,
                     returns_lse=True),
        False,
    ),
}


class SdpaBackend(AttentionBackend):
    """torch SDPA on the dense layout. `kernel="auto"` lets torch dispatch; others pin one kernel."""

    def __init__(self, kernel: str = "auto") -> None:
        if kernel not in _KERNELS:
            raise ValueError(f"unknown SDPA kernel {kernel!r}; choose from {sorted(_KERNELS)}")
        self.kernel = kernel
        self.name = "sdpa" if kernel == "auto" else f"sdpa_{kernel}"
        self._sdp_backend, self.capabilities, self._native_gqa = _KERNELS[kernel]

    def device_reason(self, device: torch.device) -> str | None:
        if self.kernel in ("flash", "cudnn") and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
            return f"torch's {self.kernel} kernel needs compute capability >= 8.0"
        return None

    def why_not(self, call, device):
        reason = super().why_not(call, device)
        if reason is None and call.causal and call.cross and self.kernel in ("flash", "cudnn"):
            return f"causal attention with different query and key lengths needs a mask, which torch's {self.kernel} kernel does not take"
        return reason

    def forward(self, query, key, value, metadata: AttentionMetadata, scale: float, return_lse: bool = False):
        if return_lse and not self.capabilities.returns_lse:
            raise AttentionBackendError(f"{self.name} cannot return the log-sum-exp; pin sdpa_cudnn, sdpa_flash or sdpa_efficient")
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        group = q.shape[1] // k.shape[1]
        if group > 1 and not self._native_gqa:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        mask, is_causal = metadata.attn_mask, False
        if metadata.causal:
            sq, sk = q.shape[2], k.shape[2]
            if mask is not None:
                keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
                mask = mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, float("-inf"))
            elif sq == sk:
                is_causal = True
            else:  # bottom-right aligned, as FlashAttention; rows that see no key come out as 0
                mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
        kwargs = {"enable_gqa": True} if group > 1 and self._native_gqa else {}
        lse = None
        if self._sdp_backend is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, **kwargs)
        else:
            try:
                out, lse = self._pinned(q, k, v, mask, is_causal, scale, bool(kwargs), return_lse)
            except RuntimeError as err:
                raise AttentionBackendError(f"{self.name}: torch's {self.kernel} kernel refused this call: {err}") from err
        if metadata.causal and q.shape[2] > k.shape[2]:
            out = out.nan_to_num(0.0)  # kernels differ on fully masked rows (NaN or garbage); define them as 0
            out[:, :, : q.shape[2] - k.shape[2]] = 0
            if lse is not None:
                lse[:, :, : q.shape[2] - k.shape[2]] = float("-inf")
        if not return_lse:
            return out.transpose(1, 2)
        return out.transpose(1, 2), lse.transpose(1, 2)

    def _pinned(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, scale: float, gqa: bool, return_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pinned kernel's aten op on `[B, H, S, D]` (no process-wide state touched): (output, log-sum-exp
        `[B, H, S]` float32 when `return_lse`, else None)."""
        aten = torch.ops.aten
        if self._sdp_backend == SDPBackend.MATH:  # its op adds a bool mask as 0/1: pass it additive
            bias = None if mask is None else _additive(mask, q.dtype)
            return aten._scaled_dot_product_attention_math(q, k, v, bias, 0.0, is_causal, None, scale=scale,
                                                           enable_gqa=gqa)[0], None
        if self._sdp_backend == SDPBackend.FLASH_ATTENTION:
            out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)[:2]
        elif self._sdp_backend == SDPBackend.CUDNN_ATTENTION:
            out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, return_lse, 0.0, is_causal, False, scale=scale)[:2]
        else:
            bias = None if mask is None else _efficient_bias(mask, q, k)
            out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, bias, return_lse, 0.0, is_causal, scale=scale)[:2]
        if not return_lse:
            return out, None
        # cuDNN may add a trailing 1 and the memory-efficient kernel pads rows to a multiple of 32.
        batch, heads, rows = q.shape[:3]
        return out, lse.reshape(batch, heads, -1)[..., :rows].float()


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean keep-mask as 0 / -inf (as F.scaled_dot_product_attention converts it); a float mask in `dtype`."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)


def _efficient_bias(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A mask as the memory-efficient kernel takes it (what F.scaled_dot_product_attention does):
    additive, in q's dtype, rows aligned to 8 elements, expanded to `[B, H, Sq, Sk]`."""
    mask = _additive(mask, q.dtype)
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if any(stride % 8 for stride in mask.stride()[:-1] if stride):
        sk = mask.shape[-1]
        mask = F.pad(mask, (0, -sk % 8))[..., :sk]
    return mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
