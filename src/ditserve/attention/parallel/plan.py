"""`SequenceParallel`: how a model splits its tokens across ranks, in one object the model holds.

A model asks it for each forward's split (`split`), for the attention wrapper of each layer
(`attention`), and to put the output back together (`gather`), and never needs to know whether
the exchange is Ulysses, ring or both. `check_heads` refuses a head count the layout cannot
split before any forward runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from ditserve.attention.backends import AttentionBackend
from ditserve.attention.layer import Attention
from ditserve.attention.parallel.hybrid import HybridAttention, HybridSplit, hybrid_split
from ditserve.attention.parallel.ring import RingAttention
from ditserve.attention.parallel.split import SequenceSplit, split_dense, split_packed
from ditserve.attention.parallel.ulysses import UlyssesAttention, kv_head_replication

__all__ = ["SequenceParallel", "as_sequence_parallel"]

Split = SequenceSplit | HybridSplit


@dataclass(frozen=True, eq=False)
class SequenceParallel:
    """A sequence-parallel layout: `kind` "ulysses" or "ring" over `group` (None: the default
    group), or "hybrid": Ulysses over `ulysses_group` inside ring over `ring_group`, `group` the
    whole U x R sequence group. Build with `ulysses`, `ring` or `hybrid`."""

    kind: str
    group: ProcessGroup | None = None
    ulysses_group: ProcessGroup | None = None
    ring_group: ProcessGroup | None = None

    @classmethod
    def ulysses(cls, group: ProcessGroup | None = None) -> SequenceParallel:
        return cls("ulysses", group)

    @classmethod
    def ring(cls, group: ProcessGroup | None = None) -> SequenceParallel:
        return cls("ring", group)

    @classmethod
    def hybrid(cls, ulysses_group: ProcessGroup, ring_group: ProcessGroup, group: ProcessGroup | None = None) -> SequenceParallel:
        return cls("hybrid", group, ulysses_group, ring_group)

    def __post_init__(self) -> None:
        if self.kind not in ("ulysses", "ring", "hybrid"):
            raise ValueError(f"sequence parallelism is 'ulysses', 'ring' or 'hybrid', got {self.kind!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("sequence parallelism needs torch.distributed initialised "
                               "(torch.distributed.init_process_group) on every rank first")

    @property
    def ulysses_degree(self) -> int:
        if self.kind == "ring":
            return 1
        return dist.get_world_size(self.ulysses_group if self.kind == "hybrid" else self.group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def check_heads(self, num_heads: int, num_kv_heads: int | None = None) -> None:
        """ValueError, naming the degrees that work, if the Ulysses part cannot split these heads."""
        kv_head_replication(num_heads, num_kv_heads or num_heads, self.ulysses_degree)

    def attention(self, inner: Attention | AttentionBackend | str | None = None) -> UlyssesAttention | RingAttention | HybridAttention:
        """The wrapper one attention layer calls with its local q/k/v and this layout's split.

        `inner`: the layer's `Attention` (Ulysses uses its selector; ring and hybrid, which need a
        backend that returns the log-sum-exp, choose among those instead), a backend name or
        instance (used as given), or None ('auto')."""
        if self.kind == "ulysses":
            return UlyssesAttention(inner, self.group)
        lse_inner = None if isinstance(inner, Attention) else inner
        if self.kind == "ring":
            return RingAttention(lse_inner, self.group)
        return HybridAttention(lse_inner, self.ulysses_group, self.ring_group, self.group)

    def split(self, lengths: int | Sequence[int], device: torch.device | str | None = None, *,
              joint_lengths: Sequence[int] | None = None) -> Split:
        """This rank's split of one forward: a dense sequence (`lengths` an int) or a packed batch."""
        if self.kind == "hybrid":
            ulysses = (dist.get_rank(self.ulysses_group), dist.get_world_size(self.ulysses_group))
            ring = (dist.get_rank(self.ring_group), dist.get_world_size(self.ring_group))
            return hybrid_split(lengths if isinstance(lengths, int) else list(lengths), ulysses, ring, device,
                                joint_lengths=joint_lengths)
        rank, size = dist.get_rank(self.group), dist.get_world_size(self.group)
        if isinstance(lengths, int):
            return split_dense(lengths, size, rank)
        return split_packed(list(lengths), size, rank, device, joint_lengths=joint_lengths)

    def gather(self, split: Split, x_local: torch.Tensor) -> torch.Tensor:
        """The whole sequence (padding dropped) from every rank's local slice."""
        if isinstance(split, HybridSplit):
            return split.gather(x_local, (self.ulysses_group, self.ring_group))
        return split.gather(x_local, self.group)


def as_sequence_parallel(layout: SequenceParallel | ProcessGroup | None, ring: bool = False) -> SequenceParallel:
    """A model's `enable_sequence_parallel` argument as a layout: a `SequenceParallel` as it is, a
    process group (or None, the default group) as Ulysses over it, or ring with `ring`."""
    if isinstance(layout, SequenceParallel):
        if ring and layout.kind != "ring":
            raise ValueError(f"ring=True contradicts the {layout.kind} layout given")
        return layout
    return SequenceParallel.ring(layout) if ring else SequenceParallel.ulysses(layout)
