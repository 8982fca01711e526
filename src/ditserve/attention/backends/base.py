"""The one interface every attention backend implements, and the call description it is judged by."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch

from ditserve.attention.metadata import AttentionMetadata

__all__ = ["AttentionBackend", "AttentionBackendError", "AttentionCall", "Capabilities", "describe_call"]


class AttentionBackendError(RuntimeError):
    """A backend was asked for a call it cannot serve (or does not exist)."""


class AttentionCall(NamedTuple):
    """Everything a backend needs to decide whether it can serve a call (no tensors).

    A NamedTuple, not a dataclass: one is made per attention call, and this is cheaper.
    """

    device_type: str
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int
    num_heads_q: int
    num_heads_kv: int
    packed: bool
    causal: bool
    has_mask: bool
    max_seq_len_q: int
    max_seq_len_k: int
    batch_size: int

    @property
    def gqa(self) -> bool:
        return self.num_heads_q != self.num_heads_kv

    @property
    def cross(self) -> bool:
        return self.max_seq_len_q != self.max_seq_len_k


@dataclass(frozen=True)
class Capabilities:
    """What a backend declares it supports; `AttentionBackend.why_not` checks calls against it."""

    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    head_dims: tuple[int, int] = (1, 1 << 30)  # inclusive range
    head_dim_multiple: int = 1
    dense: bool = True
    packed: bool = False
    masks: bool = False
    gqa: bool = True
    causal: bool = True
    cross: bool = True
    # forward(..., return_lse=True) also returns the log-sum-exp of each query's scaled scores,
    # [batch, seq, heads] (dense) / [total, heads] (packed), float32 or wider: ring attention merges by it.
    returns_lse: bool = False
    # trades accuracy for speed (FP8 products): pinned by name only, never chosen by `auto`
    lossy: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)


def _fail(message: str) -> None:
    raise ValueError(message)


def describe_call(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, metadata: AttentionMetadata
) -> AttentionCall:
    """Validate q/k/v against filled metadata and describe the call. Raises ValueError early.

    Runs on every attention call, so each shape is read once and the common case is a few
    comparisons; the detailed messages are built only on failure.
    """
    qs, ks, vs = query.shape, key.shape, value.shape
    dtype, device = query.dtype, query.device
    packed = metadata.cu_seqlens_q is not None
    want = 3 if packed else 4
    if len(qs) != want or len(ks) != want or len(vs) != want:
        layout = "[total_tokens, heads, head_dim] (packed)" if packed else "[batch, seq, heads, head_dim] (dense)"
        hint = "" if packed else "; packed 3-D inputs need metadata with cu_seqlens (AttentionMetadata.from_lengths)"
        _fail(f"query, key and value must be {layout}, got shapes {tuple(qs)}, {tuple(ks)}, {tuple(vs)}{hint}")
    if key.dtype != dtype or value.dtype != dtype:
        _fail(f"query, key and value must share one dtype, got {dtype}, {key.dtype}, {value.dtype}")
    if not dtype.is_floating_point:
        _fail(f"attention needs floating-point inputs, got {dtype}")
    if key.device != device or value.device != device:
        _fail(f"query, key and value must be on one device, got {device}, {key.device}, {value.device}")
    if qs[-1] != ks[-1]:
        _fail(f"query and key head dims differ: {qs[-1]} vs {ks[-1]}")
    if ks[:-1] != vs[:-1]:
        _fail(f"key and value must match in all but head_dim, got {tuple(ks)} and {tuple(vs)}")
    hq, hkv = qs[-2], ks[-2]
    if hq % hkv:
        _fail(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for grouped-query attention")
    mask = metadata.attn_mask
    if packed:
        total_q, total_k = sum(metadata.seq_lens_q), sum(metadata.seq_lens_k)
        if qs[0] != total_q:
            _fail(f"cu_seqlens_q ends at {total_q} but query holds {qs[0]} tokens")
        if ks[0] != total_k:
            _fail(f"cu_seqlens_k ends at {total_k} but key holds {ks[0]} tokens")
        if metadata.cu_seqlens_q.device != device or metadata.cu_seqlens_k.device != device:
            _fail(f"cu_seqlens must be on the inputs' device {device}, got {metadata.cu_seqlens_q.device}")
        batch = len(metadata.seq_lens_q)
    else:
        batch = qs[0]
        if ks[0] != batch:
            _fail(f"query and key batch sizes differ: {batch} vs {ks[0]}")
        if metadata.max_seq_len_q < qs[1] or metadata.max_seq_len_k < ks[1]:
            _fail(
                f"max_seq_len_q/k ({metadata.max_seq_len_q}, {metadata.max_seq_len_k}) must be at least the "
                f"sequence lengths ({qs[1]}, {ks[1]})"
            )
        if mask is not None:
            if mask.dim() != 4 or mask.shape[-2:] != (qs[1], ks[1]) or mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, hq):
                _fail(f"attn_mask must be [batch|1, heads|1, {qs[1]}, {ks[1]}], got {tuple(mask.shape)}")
            if mask.dtype != torch.bool and mask.dtype != dtype:
                _fail(f"attn_mask must be bool or {dtype} (additive), got {mask.dtype}")
    return AttentionCall(
        device.type, dtype, qs[-1], vs[-1], hq, hkv, packed, metadata.causal, mask is not None,
        metadata.max_seq_len_q, metadata.max_seq_len_k, batch,
    )


class AttentionBackend(ABC):
    """One attention implementation. Stateless apart from what `__init__` probes once."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run in this process at all (missing package...), or None."""
        return None

    def device_reason(self, device: torch.device) -> str | None:
        """Why this backend cannot run on this particular device (e.g. GPU generation), or None."""
        return None

    def why_not_on(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this backend cannot serve any call on `device` in `dtype`, or None: the part of `why_not`
        that a pipeline can check when it loads, before any call exists."""
        return self._why_not_for(device.type, device, dtype)

    def _why_not_for(self, device_type: str, device: torch.device, dtype: torch.dtype) -> str | None:
        caps = self.capabilities
        if device_type not in caps.devices:
            return f"runs on {sorted(caps.devices)}, not {device_type}"
        reason = self.unavailable_reason() or self.device_reason(device)
        if reason:
            return reason
        if dtype not in caps.dtypes:
            return f"supports dtypes {sorted(str(d).removeprefix('torch.') for d in caps.dtypes)}, not {str(dtype).removeprefix('torch.')}"
        return None

    def why_not(self, call: AttentionCall, device: torch.device) -> str | None:
        """The reason this backend cannot serve `call`, or None if it can."""
        reason = self._why_not_for(call.device_type, device, call.dtype)
        if reason:
            return reason
        caps = self.capabilities
        lo, hi = caps.head_dims
        for d in {call.head_dim, call.head_dim_v}:
            if not lo <= d <= hi or d % caps.head_dim_multiple:
                return f"supports head_dim {lo}..{hi} in multiples of {caps.head_dim_multiple}, not {d}"
        if call.packed and not caps.packed:
            return "does not take packed (varlen) batches"
        if not call.packed and not caps.dense:
            return "only takes packed (varlen) batches"
        if call.has_mask and not caps.masks:
            return "does not take an attn_mask"
        if call.gqa and not caps.gqa:
            return "does not support grouped-query attention"
        if call.causal and not caps.causal:
            return "does not support causal attention"
        if call.cross and not caps.cross:
            return "does not support different query and key lengths"
        return None

    @abstractmethod
    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, metadata: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """Attention over validated inputs; `metadata` is already filled. Same layout as `query`."""
