"""Ulysses sequence parallelism: swap "a slice of the tokens, every head" for "every token, a slice of the heads".

Each rank holds its chunk of the tokens for all H heads. One all-to-all per tensor turns that
into every token of H/P heads; the inner attention then runs on the whole sequence with the
whole-sequence metadata, exactly as on one GPU, and one all-to-all turns the output back. Any
backend works, and each head's maths is the single-GPU maths.

Heads: H must be divisible by P. Padding heads was the alternative; it would spend up to a
whole rank's share of attention on zeros, so an indivisible H is refused with the degrees that
work (ring attention splits no heads). Grouped-query K/V with a head count P does not divide
(fewer than P, say) are replicated up to lcm(H_kv, P) heads before the exchange, so each rank
receives the K/V heads its query heads read.

Joint tokens (Flux's text), replicated on every rank: each rank takes its heads
of them locally (no communication) and puts them in front of each sample's tokens; afterwards
their output is all-gathered over heads, so every rank ends with the same full joint output.
Key-only joint tokens (Cosmos3's kept prompt K/V, no query of their own) go in front of each
sample's keys only: the queries are the sequence's alone, so q and kv have their own lengths
(ragged cu_seqlens for each in the packed metadata), and there is no joint output to gather.
"""

from __future__ import annotations

from math import gcd

import torch

from ditserve.attention.backends import describe_call
from ditserve.attention.metadata import AttentionMetadata
from ditserve.attention.parallel.comm import all_gather_stacked, all_to_all_stacked, group_rank_and_size
from ditserve.attention.parallel.split import Joint, SequenceSplit, resolve_split
from ditserve.attention.parallel.wrapper import SequenceParallelAttention

__all__ = ["UlyssesAttention", "joint_heads", "kv_head_replication"]


def kv_head_replication(num_heads: int, num_kv_heads: int, degree: int) -> int:
    """How many copies of each K/V head Ulysses sends so that `degree` ranks each get whole groups.

    Raises ValueError, naming the degrees that work, when `num_heads` is not divisible by `degree`.
    """
    if num_heads % degree:
        working = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"Ulysses attention gives each of its {degree} ranks an equal share of the heads, so the query heads "
            f"({num_heads}) must be divisible by the Ulysses degree ({degree}); degrees that work: {working}. "
            f"Ring attention splits no heads and takes any degree."
        )
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value heads ({num_kv_heads})")
    return degree // gcd(num_kv_heads, degree)


class UlyssesAttention(SequenceParallelAttention):
    """Attention over a sequence split across the ranks of `group`, by all-to-all over heads.

    `inner`: an `Attention` (its selector chooses, on group rank 0, for every rank), a backend
    name or None ('auto'), or an `AttentionBackend`. Each rank passes its local slice
    (`[batch, local_seq, heads, dim]`, or packed `[local_tokens, heads, dim]`) and the
    `SequenceSplit` describing it (None: dense, evenly split), and gets its slice of the output,
    padded rows zero. Every rank of the group must make the same calls.
    """

    def _run(
        self, joint: Joint | None, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, split: SequenceSplit | None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        rank, size = group_rank_and_size(self.group)
        split = resolve_split(split, query, rank, size)
        split.check_inputs(query, key, value, joint)
        copies = kv_head_replication(query.shape[-2], key.shape[-2], size)
        mine = None if joint is None else joint_heads(joint, copies, rank, size)
        if copies > 1:
            key, value = key.repeat_interleave(copies, dim=-2), value.repeat_interleave(copies, dim=-2)
        q, k, v = (self.to_heads(x, split) for x in (query, key, value))
        joint_len, metadata = 0, split.global_metadata
        if mine is not None:
            jq, jk, jv = mine
            k, v = split.join(jk, k), split.join(jv, v)
            if jq is None:  # key-only joint tokens: queries the sequence's, keys [joint; sequence]
                metadata = split.joint_keys_metadata
            else:
                joint_len = jq.shape[1] if not split.packed else 0
                q = split.join(jq, q)
                metadata = split.joined_metadata
        metadata = AttentionMetadata.dense_for(q, k) if metadata is None else metadata.filled(q, k)
        scale = self.scale if self.scale is not None else query.shape[-1] ** -0.5
        backend = self.backends.backend_for(describe_call(q, k, v, metadata), q.device, (q, k, v, metadata, scale))
        out = backend.forward(q, k, v, metadata, scale)
        if joint is None or joint[0] is None:
            return None, self.to_sequence(out, split)
        joint_out, out = split.unjoin(out, joint_len)
        gathered = all_gather_stacked(joint_out, self.group)  # [P, ..., H/P, dim]: rank p's heads
        return gathered.movedim(0, -3).flatten(-3, -2), self.to_sequence(out, split)

    def to_heads(self, x: torch.Tensor, split: SequenceSplit) -> torch.Tensor:
        """Local slice, all heads -> whole sequence, this rank's heads."""
        size = split.world_size
        return split.from_chunks(all_to_all_stacked(x.unflatten(-2, (size, -1)).movedim(-3, 0), self.group))

    def to_sequence(self, out: torch.Tensor, split: SequenceSplit) -> torch.Tensor:
        """Whole sequence, this rank's heads -> local slice, all heads."""
        return all_to_all_stacked(split.to_chunks(out), self.group).movedim(0, -3).flatten(-3, -2)

    def extra_repr(self) -> str:
        return f"backend={self.backends.name!r}, scale={self.scale}"


def joint_heads(joint: Joint, copies: int, rank: int, size: int) -> Joint:
    """This rank's heads of the replicated joint q/k/v (K/V replicated as the sequence's are; no query stays None)."""
    jq, jk, jv = joint
    if copies > 1:
        jk, jv = jk.repeat_interleave(copies, dim=-2), jv.repeat_interleave(copies, dim=-2)

    def mine(x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-2, (size, -1)).select(-3, rank)

    return None if jq is None else mine(jq), mine(jk), mine(jv)
