"""Ulysses inside ring: a sequence split over a grid of U x R ranks (unified sequence parallelism).

Ulysses alone needs the heads to divide by its degree and all-to-alls every token over every rank;
ring alone passes the whole K/V round every rank. The hybrid uses each where it is cheap: ranks
of one Ulysses group (U, ideally on one NVLink island) exchange heads by all-to-all, and the R
Ulysses groups pass K/V round a ring between them.

Layout: the sequence is first split into R ring chunks (`ring`: a `SequenceSplit` over the ring
group, padded as ring attention pads), and each ring chunk into U pieces (`ulysses`: a
`SequenceSplit` over the Ulysses group of the ring chunk's padded lengths). A rank holds piece u
of ring chunk r. In attention, the Ulysses all-to-all turns "piece u, all heads" into "the whole
ring chunk r, heads slice u"; ring attention then runs over the ring group for those heads; the
all-to-all turns the output back. Ring padding is masked by ring attention's row plans and zeroed
in its output; Ulysses padding is dropped and re-added by the all-to-alls.

Joint tokens (Flux's text) are handled by the ring part with this rank's heads of them; their
output is all-gathered over the Ulysses group, so every rank ends with the same full joint output.
Key-only joint tokens (Cosmos3's kept prompt K/V) are this rank's heads of one more ring chunk.
The inner backend is agreed over the whole U x R group, so no two ranks run different kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.distributed import ProcessGroup

from ditserve.attention.backends import AttentionBackend
from ditserve.attention.layer import Attention
from ditserve.attention.parallel.agreement import AgreedBackends
from ditserve.attention.parallel.comm import all_gather_stacked, group_rank_and_size
from ditserve.attention.parallel.ring import RingAttention
from ditserve.attention.parallel.split import Joint, SequenceSplit, split_dense, split_packed
from ditserve.attention.parallel.ulysses import UlyssesAttention, joint_heads, kv_head_replication
from ditserve.attention.parallel.wrapper import ParallelAttentionCalls

__all__ = ["HybridAttention", "HybridSplit", "hybrid_split"]


@dataclass(eq=False)  # immutable by convention, not frozen: see AttentionMetadata
class HybridSplit:
    """One forward's split over U x R ranks: `ring` (the sequence over the ring group) and
    `ulysses` (this rank's ring chunk over the Ulysses group). Models use it as a `SequenceSplit`:
    `shard`, `gather`, `packed`, `chunks`."""

    ring: SequenceSplit
    ulysses: SequenceSplit

    @property
    def packed(self) -> bool:
        return self.ring.packed

    @property
    def chunks(self) -> tuple[int, ...]:
        """Tokens of each sample this rank holds (padded)."""
        return self.ulysses.chunks

    @property
    def local_len(self) -> int:
        return self.ulysses.local_len

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's piece of the whole sequence `x` (padded); no communication."""
        return self.ulysses.shard(self.ring.shard(x))

    def gather(self, x_local: torch.Tensor, groups: tuple[ProcessGroup | None, ProcessGroup | None]) -> torch.Tensor:
        """The whole sequence from every rank's piece; `groups` = (Ulysses group, ring group)."""
        ulysses_group, ring_group = groups
        return self.ring.gather(self.ulysses.gather(x_local, ulysses_group), ring_group)


def hybrid_split(
    lengths: int | Sequence[int],
    ulysses: tuple[int, int],
    ring: tuple[int, int],
    device: torch.device | str | None = None,
    *,
    joint_lengths: Sequence[int] | None = None,
) -> HybridSplit:
    """The split of a dense sequence (`lengths` an int) or a packed batch (one length per sample)
    for the rank at (Ulysses rank, size) `ulysses` and (ring rank, size) `ring`."""
    (u, u_size), (r, r_size) = ulysses, ring
    if isinstance(lengths, int):
        ring_split = split_dense(lengths, r_size, r)
        return HybridSplit(ring_split, split_dense(ring_split.chunks[0], u_size, u))
    ring_split = split_packed(lengths, r_size, r, device, joint_lengths=joint_lengths)
    return HybridSplit(ring_split, split_packed(ring_split.chunks, u_size, u, device))


class HybridAttention(ParallelAttentionCalls):
    """Attention over a sequence split by `HybridSplit`: Ulysses over `ulysses_group`, ring over
    `ring_group`, the backend agreed over `group` (the whole U x R sequence group; None: default).

    Called as `UlyssesAttention` is (`ParallelAttentionCalls`), with a `HybridSplit`: each rank's
    local piece; `forward_joint` adds joint tokens held whole on every rank, `forward_joint_keys`
    joint keys and values without queries. Heads must divide by U; the
    backend must return the log-sum-exp (the ring part merges by it).
    """

    def __init__(
        self,
        inner: Attention | AttentionBackend | str | None,
        ulysses_group: ProcessGroup | None,
        ring_group: ProcessGroup | None,
        group: ProcessGroup | None = None,
        *,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        self.ulysses = UlyssesAttention(inner, ulysses_group, scale=scale)
        self.ring = RingAttention(inner, ring_group, scale=scale)
        self.ring.backends = AgreedBackends(inner, group, needs_lse=True)  # one choice for all U x R ranks
        self.backends = self.ring.backends

    def _run(
        self, joint: Joint | None, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        split: HybridSplit,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        if not isinstance(split, HybridSplit):
            raise TypeError(f"hybrid attention needs a HybridSplit (hybrid_split(...)), got {type(split).__name__}")
        u_rank, u_size = group_rank_and_size(self.ulysses.group)
        if (split.ulysses.rank, split.ulysses.world_size) != (u_rank, u_size):
            raise ValueError(f"the split was made for Ulysses rank {split.ulysses.rank} of {split.ulysses.world_size}, "
                             f"but this is rank {u_rank} of a Ulysses group of {u_size}")
        split.ulysses.check_inputs(query, key, value)
        copies = kv_head_replication(query.shape[-2], key.shape[-2], u_size)
        mine = None if joint is None else joint_heads(joint, copies, u_rank, u_size)
        if copies > 1:
            key, value = key.repeat_interleave(copies, dim=-2), value.repeat_interleave(copies, dim=-2)
        q, k, v = (self.ulysses.to_heads(x, split.ulysses) for x in (query, key, value))  # ring chunk, my heads
        joint_out, out = self.ring._run(mine, q, k, v, split.ring)
        out = self.ulysses.to_sequence(out, split.ulysses)
        if joint_out is None:
            return None, out
        gathered = all_gather_stacked(joint_out, self.ulysses.group)  # [U, ..., H/U, dim]: Ulysses rank u's heads
        return gathered.movedim(0, -3).flatten(-3, -2), out

    def extra_repr(self) -> str:
        return f"backend={self.backends.name!r}"
