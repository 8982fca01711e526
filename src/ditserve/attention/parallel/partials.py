"""Attention over one block of keys at a time, and merging the blocks by their log-sum-exp.

softmax over keys K1 ∪ K2 equals the two partial softmaxes weighted by exp(lse_i - lse), with
lse = logaddexp(lse_1, lse_2); so ring attention can see the keys one block at a time and
still give the full-sequence result. A `BlockPlan` says which query rows meet which key rows
of a block (padding dropped, samples with no key in the block left out), so every call a
backend sees is a plain, valid attention call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ditserve.attention.backends import AttentionBackend, AttentionBackendError, describe_call
from ditserve.attention.metadata import AttentionMetadata
from ditserve.transfer import to_device

__all__ = ["BlockPlan", "PartialSum", "attend_block", "dense_block_plan", "merge_partials", "packed_block_plan"]


@dataclass(frozen=True, eq=False)
class BlockPlan:
    """Which rows of a query tensor attend to which rows of one key/value block.

    `empty`: nothing to attend (every key of the block is padding). Packed: `metadata` for the
    selected rows, `q_rows`/`kv_rows` the selected row indices (None = all rows). Dense:
    `kv_len` keeps the first keys of the block (None = all); `metadata` is None.
    """

    empty: bool = False
    metadata: AttentionMetadata | None = None
    q_rows: torch.Tensor | None = None
    kv_rows: torch.Tensor | None = None
    kv_len: int | None = None


def dense_block_plan(kv_valid: int | None) -> BlockPlan:
    """Dense: attend to the first `kv_valid` keys of the block (None = all of them)."""
    return BlockPlan(empty=kv_valid == 0, kv_len=kv_valid)


def _rows(offsets: Sequence[int], counts: Sequence[int], samples: Sequence[int]) -> torch.Tensor:
    return torch.cat([torch.arange(offsets[i], offsets[i] + counts[i]) for i in samples])


def _offsets(lengths: Sequence[int]) -> list[int]:
    out = [0]
    for n in lengths[:-1]:
        out.append(out[-1] + n)
    return out


def packed_block_plan(
    q_lens: Sequence[int], kv_layout: Sequence[int], kv_valid: Sequence[int], device: torch.device | None
) -> BlockPlan:
    """Packed: queries laid out by `q_lens`, a key block laid out by `kv_layout` per sample of
    which the first `kv_valid` rows are real. Samples with queries but no real key are left out
    (their rows take no part); padded key rows are dropped."""
    n = len(q_lens)
    take = [i for i in range(n) if not (q_lens[i] > 0 and kv_valid[i] == 0)]
    if not any(q_lens[i] for i in take):
        return BlockPlan(empty=True)
    q_rows = None if len(take) == n else to_device(_rows(_offsets(q_lens), q_lens, take), device)
    kv_rows = None if tuple(kv_valid) == tuple(kv_layout) else to_device(_rows(_offsets(kv_layout), kv_valid, take), device)
    metadata = AttentionMetadata.from_lengths([q_lens[i] for i in take], [kv_valid[i] for i in take], device)
    return BlockPlan(metadata=metadata, q_rows=q_rows, kv_rows=kv_rows)


def attend_block(
    backend: AttentionBackend, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: BlockPlan, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp) of `plan`'s query rows over its key rows; the plan must not be empty."""
    if plan.q_rows is not None:
        query = query.index_select(0, plan.q_rows)
    if plan.kv_rows is not None:
        key, value = key.index_select(0, plan.kv_rows), value.index_select(0, plan.kv_rows)
    if plan.kv_len is not None and plan.kv_len != key.shape[1]:
        key, value = key[:, : plan.kv_len], value[:, : plan.kv_len]
    metadata = AttentionMetadata.dense_for(query, key) if plan.metadata is None else plan.metadata.filled(query, key)
    reason = backend.why_not(describe_call(query, key, value, metadata), query.device)
    if reason is not None:
        raise AttentionBackendError(f"attention backend {backend.name!r} cannot serve a ring block: {reason}")
    return backend.forward(query, key, value, metadata, scale, return_lse=True)


class PartialSum:
    """The running merge of partial attention results over disjoint key blocks, per query row.

    Accumulates in float32 (float64 for float64 inputs). Rows no block reached stay zero.
    """

    def __init__(self, rows_shape: torch.Size, head_dim_v: int, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype = torch.promote_types(dtype, torch.float32)
        self._shape = (tuple(rows_shape), head_dim_v, device)
        self._out: torch.Tensor | None = None
        self._lse: torch.Tensor | None = None

    def add(self, out: torch.Tensor, lse: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Merge a partial result; `rows` = the query rows (dim 0) it covers, None = all."""
        out, lse = out.to(self.dtype), lse.to(self.dtype)
        if self._out is None and rows is None:
            self._out, self._lse = out, lse
            return
        if self._out is None:
            self._out, self._lse = self.totals()
        if rows is None:
            self._out, self._lse = merge_partials(self._out, self._lse, out, lse)
            return
        merged_out, merged_lse = merge_partials(self._out.index_select(0, rows), self._lse.index_select(0, rows), out, lse)
        self._out.index_copy_(0, rows, merged_out)
        self._lse.index_copy_(0, rows, merged_lse)

    def totals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, log-sum-exp) of every row in the accumulation dtype; zeros and -inf where nothing was added."""
        if self._out is not None:
            return self._out, self._lse
        shape, dv, device = self._shape
        return (
            torch.zeros(shape + (dv,), dtype=self.dtype, device=device),
            torch.full(shape, float("-inf"), dtype=self.dtype, device=device),
        )

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        """The merged output in `dtype`."""
        return self.totals()[0].to(dtype)


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partial results over disjoint keys -> the result over their union. -inf = no key."""
    lse = torch.logaddexp(lse_a, lse_b)
    ref = lse.masked_fill(lse == float("-inf"), 0.0)  # rows with no key at all: both weights 0, not NaN
    out = out_a * torch.exp(lse_a - ref).unsqueeze(-1) + out_b * torch.exp(lse_b - ref).unsqueeze(-1)
    return out, lse
