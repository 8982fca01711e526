"""How a sequence is split across the ranks of a sequence-parallel group, and put back together.

All-to-all and ring exchanges need every rank to hold the same number of tokens, so each
sample is cut into P chunks of ceil(L / P) tokens and the last chunk(s) padded. The padding is
never attended: the wrappers drop padded keys through the metadata and row plans built from a
`SequenceSplit`, and zero the padded rows of their outputs. The model is not changed; it runs
its per-token layers on a few padded rows, which `gather` drops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch.distributed import ProcessGroup

from ditserve.attention.metadata import AttentionMetadata
from ditserve.attention.parallel.comm import all_gather_stacked
from ditserve.attention.parallel.partials import BlockPlan, dense_block_plan, packed_block_plan

__all__ = ["Joint", "SequenceSplit", "resolve_split", "split_dense", "split_packed"]

# Joint tokens held whole on every rank: (query, key, value); query None for key-only joint
# tokens (Cosmos3's prompt K/V, kept from `prepare`: attended to, with no query of their own).
Joint = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]


@dataclass(eq=False)  # immutable by convention, not frozen: see AttentionMetadata
class SequenceSplit:
    """One forward's split of a dense sequence or a packed batch across `world_size` ranks.

    Dense tensors are `[batch, seq, ...]`, split along dim 1; `lengths` holds the one sequence
    length the batch shares. Packed tensors are `[total, ...]`, split along dim 0, one length per
    sample; each sample is split on its own, so a rank holds chunk `rank` of every sample, back
    to back (its local metadata is `local_metadata`). `joint_lengths` (packed only) counts each
    sample's joint tokens, which are replicated on every rank rather than split.

    Build it once per forward with `split_dense` / `split_packed`, like `AttentionMetadata`; the
    index tensors it needs are made on first use and kept on it.
    """

    world_size: int
    rank: int
    lengths: tuple[int, ...]
    packed: bool
    device: torch.device | None = None
    joint_lengths: tuple[int, ...] | None = None
    chunks: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {self.rank} of {self.world_size}")
        if not self.lengths or any(n < 0 for n in self.lengths) or sum(self.lengths) == 0:
            raise ValueError(f"lengths must be >= 0 with at least one token, got {list(self.lengths)}")
        if not self.packed and len(self.lengths) != 1:
            raise ValueError("a dense split has one sequence length, shared by the whole batch")
        if self.joint_lengths is not None:
            if not self.packed:
                raise ValueError("joint_lengths describe a packed batch; dense joint tokens take their length from the tensor")
            if len(self.joint_lengths) != len(self.lengths) or any(n < 0 for n in self.joint_lengths):
                raise ValueError(f"joint_lengths must hold one count >= 0 per sample, got {list(self.joint_lengths)}")
        self.chunks = tuple(-(-n // self.world_size) for n in self.lengths)

    # ---- sizes ----------------------------------------------------------------------------
    def valid(self, rank: int) -> tuple[int, ...]:
        """Real (unpadded) tokens of each sample in `rank`'s chunk."""
        return tuple(max(0, min(c, n - rank * c)) for n, c in zip(self.lengths, self.chunks))

    @property
    def local_len(self) -> int:
        """Tokens each rank holds: the padded chunk length (dense) or the sum of them (packed)."""
        return sum(self.chunks)

    @cached_property
    def local_metadata(self) -> AttentionMetadata | None:
        """Metadata of one rank's (padded) slice for a packed batch; None for dense."""
        return AttentionMetadata.from_lengths(self.chunks, device=self.device) if self.packed else None

    @cached_property
    def global_metadata(self) -> AttentionMetadata | None:
        """Metadata of the whole unpadded packed batch; None for dense."""
        return AttentionMetadata.from_lengths(self.lengths, device=self.device) if self.packed else None

    @cached_property
    def joined_metadata(self) -> AttentionMetadata | None:
        """Metadata of the whole packed batch with each sample's joint tokens in front of it."""
        if not self.packed or self.joint_lengths is None:
            return None
        return AttentionMetadata.from_lengths([j + n for j, n in zip(self.joint_lengths, self.lengths)], device=self.device)

    @cached_property
    def joint_keys_metadata(self) -> AttentionMetadata | None:
        """Metadata of the whole packed batch whose joint tokens are keys only: queries the
        sequence's tokens, keys each sample's joint tokens then its sequence tokens."""
        if not self.packed or self.joint_lengths is None:
            return None
        kv_lengths = [j + n for j, n in zip(self.joint_lengths, self.lengths)]
        return AttentionMetadata.from_lengths(self.lengths, kv_lengths, device=self.device)

    # ---- from the whole sequence to chunks and back -------------------------------------------
    @cached_property
    def _gather_index(self) -> torch.Tensor:
        """Packed: for each token of the whole batch, its row in the `[P * local_len]` stack of chunks."""
        local, pieces, offset = self.local_len, [], 0
        for n, c in zip(self.lengths, self.chunks):
            pos = torch.arange(n)
            owner = pos // c if c else pos
            pieces.append(owner * local + offset + pos - owner * c)
            offset += c
        return torch.cat(pieces).to(self.device)

    def to_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """The whole sequence -> `[P, *local shape]`: chunk p is rank p's slice, padding zero."""
        p, c = self.world_size, self.local_len
        if self.packed:
            self._check_rows(x, 0, sum(self.lengths), "whole")
            stacked = x.new_zeros((p * c,) + tuple(x.shape[1:]))
            return stacked.index_copy_(0, self._gather_index, x).view((p, c) + tuple(x.shape[1:]))
        self._check_rows(x, 1, self.lengths[0], "whole")
        padded = x.new_zeros((x.shape[0], p * c) + tuple(x.shape[2:]))
        padded[:, : x.shape[1]] = x
        return padded.unflatten(1, (p, c)).movedim(1, 0)

    def from_chunks(self, stacked: torch.Tensor) -> torch.Tensor:
        """`[P, *local shape]` (chunk p from rank p) -> the whole sequence, padding dropped."""
        p, c = self.world_size, self.local_len
        if stacked.shape[0] != p:
            raise ValueError(f"expected {p} stacked chunks, got {stacked.shape[0]}")
        if self.packed:
            return stacked.reshape((p * c,) + tuple(stacked.shape[2:])).index_select(0, self._gather_index)
        return stacked.movedim(0, 1).flatten(1, 2)[:, : self.lengths[0]]

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the whole sequence `x` (padded); no communication."""
        return self.to_chunks(x)[self.rank].contiguous()

    def gather(self, x_local: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
        """The whole sequence from every rank's slice (an all-gather), padding dropped."""
        self._check_rows(x_local, 0 if self.packed else 1, self.local_len, "local")
        return self.from_chunks(all_gather_stacked(x_local, group))

    def zero_padding(self, x_local: torch.Tensor) -> torch.Tensor:
        """`x_local` with this rank's padded rows set to zero (in place)."""
        if self.packed:
            if self._padded_rows is not None:
                x_local.index_fill_(0, self._padded_rows, 0)
        else:
            x_local[:, self.valid(self.rank)[0] :] = 0
        return x_local

    @cached_property
    def _padded_rows(self) -> torch.Tensor | None:
        valid, offset, rows = self.valid(self.rank), 0, []
        for c, v in zip(self.chunks, valid):
            rows.append(torch.arange(offset + v, offset + c))
            offset += c
        rows_t = torch.cat(rows)
        return rows_t.to(self.device) if rows_t.numel() else None

    # ---- joint tokens in front of each sample (Ulysses) ------------------------------------------
    @cached_property
    def _joined_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed: rows of the joint tokens and of the sequence tokens in the joined layout."""
        joint_rows, seq_rows, offset = [], [], 0
        for j, n in zip(self.joint_lengths, self.lengths):
            joint_rows.append(torch.arange(offset, offset + j))
            seq_rows.append(torch.arange(offset + j, offset + j + n))
            offset += j + n
        return torch.cat(joint_rows).to(self.device), torch.cat(seq_rows).to(self.device)

    def join(self, joint: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """Whole sequence with each sample's joint tokens in front: `[joint_i; seq_i]` per sample."""
        if not self.packed:
            return torch.cat([joint, seq], dim=1)
        self._need_joint_lengths()
        joint_rows, seq_rows = self._joined_rows
        out = seq.new_empty((joint.shape[0] + seq.shape[0],) + tuple(seq.shape[1:]))
        return out.index_copy_(0, joint_rows, joint).index_copy_(0, seq_rows, seq)

    def unjoin(self, joined: torch.Tensor, joint_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of `join`: (joint tokens, sequence tokens). `joint_len`: dense joint length."""
        if not self.packed:
            return joined[:, :joint_len], joined[:, joint_len:]
        joint_rows, seq_rows = self._joined_rows
        return joined.index_select(0, joint_rows), joined.index_select(0, seq_rows)

    # ---- ring: which rows meet which keys ---------------------------------------------------
    @cached_property
    def ring_plans(self) -> tuple[BlockPlan, ...]:
        """Plan for this rank's queries against the key block of each source rank."""
        if not self.packed:
            return tuple(dense_block_plan(self.valid(src)[0]) for src in range(self.world_size))
        return tuple(packed_block_plan(self.chunks, self.chunks, self.valid(src), self.device) for src in range(self.world_size))

    @cached_property
    def joint_key_plan(self) -> BlockPlan:
        """Plan for this rank's queries against the (replicated) joint keys."""
        if not self.packed:
            return dense_block_plan(None)
        self._need_joint_lengths()
        return packed_block_plan(self.chunks, self.joint_lengths, self.joint_lengths, self.device)

    @cached_property
    def joint_query_plans(self) -> tuple[BlockPlan, BlockPlan]:
        """Plans for the joint queries: against the joint keys, and against this rank's own key block."""
        if not self.packed:
            return dense_block_plan(None), dense_block_plan(self.valid(self.rank)[0])
        self._need_joint_lengths()
        joint = self.joint_lengths
        return (
            packed_block_plan(joint, joint, joint, self.device),
            packed_block_plan(joint, self.chunks, self.valid(self.rank), self.device),
        )

    # ---- checks -------------------------------------------------------------------------
    def check_inputs(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, joint: Joint | None = None) -> None:
        """Raise unless q/k/v are laid out as this split's local slice, and the joint q/k/v (if any;
        the query may be None) as its replicated joint tokens with the sequence's batch, heads and head_dim."""
        local = (query, key, value)
        for name, x in zip(("query", "key", "value"), local):
            self._check_local(x, name)
        if joint is None:
            return
        for name, x, like in zip(("joint_query", "joint_key", "joint_value"), joint, local):
            if x is None and name == "joint_query":
                continue
            self._check_joint(x, name)
            if x.shape[-2:] != like.shape[-2:] or (not self.packed and x.shape[0] != like.shape[0]):
                raise ValueError(
                    f"{name} must match the sequence's batch, heads and head_dim: got shape {tuple(x.shape)} next to {tuple(like.shape)}"
                )

    def _check_local(self, x: torch.Tensor, name: str) -> None:
        dims = 3 if self.packed else 4
        if x.dim() != dims:
            layout = "[local_tokens, heads, head_dim] (packed)" if self.packed else "[batch, local_seq, heads, head_dim] (dense)"
            raise ValueError(f"{name} must be {layout} for this split, got shape {tuple(x.shape)}")
        self._check_rows(x, 0 if self.packed else 1, self.local_len, "local")
        mine = self.device or torch.device("cpu")
        if self.packed and (x.device.type != mine.type or mine.index not in (None, x.device.index)):
            raise ValueError(f"{name} is on {x.device} but the split's index tensors are on {self.device}; pass device= to split_packed")

    def _check_joint(self, x: torch.Tensor, name: str) -> None:
        if self.packed:
            self._need_joint_lengths()
            if x.dim() != 3 or x.shape[0] != sum(self.joint_lengths):
                raise ValueError(
                    f"{name} must be [{sum(self.joint_lengths)}, heads, head_dim] (the split's joint_lengths "
                    f"{list(self.joint_lengths)}), got shape {tuple(x.shape)}"
                )
        elif x.dim() != 4:
            raise ValueError(f"{name} must be [batch, joint_seq, heads, head_dim] for a dense split, got shape {tuple(x.shape)}")

    def _need_joint_lengths(self) -> None:
        if self.joint_lengths is None:
            raise ValueError("joint tokens in a packed batch need the split built with joint_lengths (split_packed(..., joint_lengths=...))")

    def _check_rows(self, x: torch.Tensor, dim: int, want: int, what: str) -> None:
        if x.dim() <= dim or x.shape[dim] != want:
            raise ValueError(
                f"expected the {what} sequence with {want} tokens along dim {dim} "
                f"({'packed' if self.packed else 'dense'} split of lengths {list(self.lengths)} over {self.world_size} ranks), "
                f"got shape {tuple(x.shape)}"
            )


def split_dense(seq_len: int, world_size: int, rank: int) -> SequenceSplit:
    """Split a dense `[batch, seq_len, ...]` sequence into `world_size` chunks of ceil(seq_len / P), the last padded."""
    return SequenceSplit(world_size, rank, (int(seq_len),), packed=False)


def split_packed(
    lengths: Sequence[int],
    world_size: int,
    rank: int,
    device: torch.device | str | None = None,
    *,
    joint_lengths: Sequence[int] | None = None,
) -> SequenceSplit:
    """Split each sample of a packed batch into `world_size` chunks of ceil(L / P), the last padded.

    `device`: where the metadata and index tensors live (the activations' device).
    `joint_lengths`: per-sample joint tokens (e.g. Flux's text), if the call has any.
    """
    return SequenceSplit(
        world_size,
        rank,
        tuple(int(n) for n in lengths),
        packed=True,
        device=torch.device(device) if device is not None else None,
        joint_lengths=None if joint_lengths is None else tuple(int(n) for n in joint_lengths),
    )


def resolve_split(split: SequenceSplit | None, query: torch.Tensor, rank: int, world_size: int) -> SequenceSplit:
    """`split` checked against the group, or for None an even dense split inferred from `query`."""
    if split is None:
        if query.dim() != 4:
            raise ValueError("a packed call needs a SequenceSplit describing it (split_packed(lengths, world_size, rank, device))")
        return split_dense(world_size * query.shape[1], world_size, rank)
    if split.world_size != world_size or split.rank != rank:
        raise ValueError(
            f"the split was made for rank {split.rank} of {split.world_size}, but this is rank {rank} of a group of {world_size}"
        )
    return split
