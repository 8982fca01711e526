"""Attention metadata: built once per forward pass, passed down to every attention call.

Nothing here is global. A model builds one `AttentionMetadata` per forward (per kind of
attention: self, cross) and hands it to each layer as an argument; backends read it and
never look anywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import FrozenInstanceError, dataclass
from typing import Any

import torch

from ditserve.transfer import to_device

__all__ = ["AttentionMetadata"]


def _lengths_from_cu(cu: torch.Tensor, name: str) -> tuple[int, ...]:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype int32, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with batch+1 >= 2 entries, got shape {tuple(cu.shape)}")
    values = cu.tolist()  # one host sync, once per forward at build time
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    lengths = tuple(b - a for a, b in zip(values[:-1], values[1:]))
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    return lengths


def _check_lengths(lengths: Sequence[int], name: str) -> tuple[int, ...]:
    out = tuple(int(n) for n in lengths)
    if not out:
        raise ValueError(f"{name} must hold at least one sample")
    if any(n < 0 for n in out):
        raise ValueError(f"{name} must be >= 0, got {list(out)}")
    return out


def _cu_from_lengths(lengths: Sequence[int], device: torch.device | str | None) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return to_device(torch.tensor(cu, dtype=torch.int32), device)


@dataclass(eq=False)
class AttentionMetadata:
    """What a backend needs to know about one attention call beyond q, k and v.

    Dense calls (`[batch, seq, heads, dim]`) need nothing: every field may stay None.
    Packed ragged calls (`[total_tokens, heads, dim]`) carry `cu_seqlens_q/k` (int32, on the
    tensors' device) and the same lengths on the host (`seq_lens_q/k`), so that no backend has
    to synchronise with the device to learn them. `max_seq_len_q/k` are upper bounds a
    caller may set (e.g. fixed for CUDA graphs); a backend fills them from the tensors only
    where they are None (see `filled`).

    `causal` masks key j for query i when j > i + (len_k - len_q) (bottom-right aligned, as
    FlashAttention does). `attn_mask` is an optional dense mask `[batch|1, heads|1, Sq, Sk]`:
    boolean (True = attend) or additive float; only backends that declare masks take it.

    Immutable once built: assigning a field raises (`filled` and `dataclasses.replace` make
    copies). It is sealed by hand rather than a frozen dataclass because torch 2.11's dynamo turns
    every field of a frozen dataclass into a guard: a compiled block recompiled for each new number
    of packed samples (`len(seq_lens_k) == n`).
    """

    max_seq_len_q: int | None = None
    max_seq_len_k: int | None = None
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    seq_lens_q: tuple[int, ...] | None = None
    seq_lens_k: tuple[int, ...] | None = None
    causal: bool = False
    attn_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.cu_seqlens_k is not None and self.cu_seqlens_q is None:
            raise ValueError("cu_seqlens_k was given without cu_seqlens_q; a packed call needs both (or q alone for self-attention)")
        if self.cu_seqlens_q is not None:
            lens_q = _lengths_from_cu(self.cu_seqlens_q, "cu_seqlens_q") if self.seq_lens_q is None else _check_lengths(self.seq_lens_q, "seq_lens_q")
            if self.cu_seqlens_k is None:  # self-attention: keys are the queries' segments
                self.cu_seqlens_k = self.cu_seqlens_q
                if self.seq_lens_k is None:
                    self.seq_lens_k = lens_q
            lens_k = _lengths_from_cu(self.cu_seqlens_k, "cu_seqlens_k") if self.seq_lens_k is None else _check_lengths(self.seq_lens_k, "seq_lens_k")
            if self.cu_seqlens_q.numel() != self.cu_seqlens_k.numel():
                raise ValueError(
                    f"cu_seqlens_q and cu_seqlens_k must describe the same number of samples, got "
                    f"{self.cu_seqlens_q.numel() - 1} and {self.cu_seqlens_k.numel() - 1}"
                )
            if len(lens_q) != self.cu_seqlens_q.numel() - 1 or len(lens_k) != self.cu_seqlens_k.numel() - 1:
                raise ValueError("seq_lens_q/k must have one entry per sample of cu_seqlens_q/k")
            if any(nq > 0 and nk == 0 for nq, nk in zip(lens_q, lens_k)):
                raise ValueError(f"every sample with queries needs at least one key, got kv lengths {list(lens_k)}")
            self.seq_lens_q = lens_q
            self.seq_lens_k = lens_k
        elif self.seq_lens_q is not None or self.seq_lens_k is not None:
            raise ValueError("seq_lens_q/k describe a packed batch and need cu_seqlens_q; use AttentionMetadata.from_lengths")
        for name in ("max_seq_len_q", "max_seq_len_k"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if self.packed:
            for name, lens in (("max_seq_len_q", self.seq_lens_q), ("max_seq_len_k", self.seq_lens_k)):
                value = getattr(self, name)
                if value is not None and value < max(lens):
                    raise ValueError(f"{name}={value} is smaller than the longest sample ({max(lens)}); it must be an upper bound")
        if self.attn_mask is not None and self.packed:
            raise ValueError("attn_mask is only supported for dense (unpacked) calls; packed samples are already isolated by cu_seqlens")
        self._sealed = True

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_sealed", False):
            raise FrozenInstanceError(f"cannot assign to field {name!r}: AttentionMetadata is immutable "
                                      "(dataclasses.replace makes a changed copy)")
        object.__setattr__(self, name, value)

    @classmethod
    def from_lengths(
        cls,
        q_lens: Sequence[int],
        kv_lens: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        *,
        causal: bool = False,
        max_seq_len_q: int | None = None,
        max_seq_len_k: int | None = None,
    ) -> AttentionMetadata:
        """Metadata for a packed ragged batch from per-sample lengths (kv defaults to q's).

        Builds `cu_seqlens` on `device` once; no device sync is needed later.
        """
        lens_q = _check_lengths(q_lens, "q_lens")
        lens_k = lens_q if kv_lens is None else _check_lengths(kv_lens, "kv_lens")
        if len(lens_q) != len(lens_k):
            raise ValueError(f"q_lens and kv_lens must have one entry per sample, got {len(lens_q)} and {len(lens_k)}")
        cu_q = _cu_from_lengths(lens_q, device)
        cu_k = cu_q if kv_lens is None else _cu_from_lengths(lens_k, device)
        return cls(
            max_seq_len_q=max_seq_len_q,
            max_seq_len_k=max_seq_len_k,
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            seq_lens_q=lens_q,
            seq_lens_k=lens_k,
            causal=causal,
        )

    @property
    def packed(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def batch_size(self) -> int | None:
        return None if self.seq_lens_q is None else len(self.seq_lens_q)

    def filled(self, query: torch.Tensor, key: torch.Tensor) -> AttentionMetadata:
        """This metadata with each None `max_seq_len_*` filled from the tensors.

        Dense: from `query.shape[1]` / `key.shape[1]`. Packed: from the longest sample.
        A value the caller set is never overwritten (it may be a larger upper bound).
        """
        if self.max_seq_len_q is not None and self.max_seq_len_k is not None:
            return self
        if self.packed:
            max_q, max_k = max(self.seq_lens_q), max(self.seq_lens_k)
        else:
            max_q, max_k = query.shape[1], key.shape[1]
        return self._with_max(
            self.max_seq_len_q if self.max_seq_len_q is not None else max_q,
            self.max_seq_len_k if self.max_seq_len_k is not None else max_k,
        )

    def _with_max(self, max_q: int, max_k: int) -> AttentionMetadata:
        # A field-for-field copy without re-running validation: this runs on every attention
        # call, and only the two bounds change, both taken from validated lengths or shapes.
        new = object.__new__(AttentionMetadata)
        new.__dict__.update(self.__dict__)
        new.__dict__["max_seq_len_q"] = max_q
        new.__dict__["max_seq_len_k"] = max_k
        return new

    @staticmethod
    def dense_for(query: torch.Tensor, key: torch.Tensor) -> AttentionMetadata:
        """Metadata for a call given none: the dense shapes of q and k."""
        return _EMPTY._with_max(query.shape[1], key.shape[1])


_EMPTY = AttentionMetadata()  # immutable template for dense_for
