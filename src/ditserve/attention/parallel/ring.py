"""Ring sequence parallelism: keep the queries, pass the keys and values around.

Each rank keeps its query chunk and attends to one K/V chunk at a time: its own, then the
previous rank's, and so on round the ring (point-to-point send/receive, the next chunk in
flight while the current one is attended). Partial outputs are merged by their log-sum-exp
(`partials.merge_partials`), so the backend must return it: backends say so in
`Capabilities.returns_lse`, and a backend that cannot is refused with the list of those that
can. No heads are split, so any head count and any grouped-query layout work as they are.

Padded keys (uneven lengths) are dropped per chunk through the split's row plans; a sample
whose keys in a chunk are all padding sits that chunk out.

Joint tokens (Flux's text), replicated on every rank: they are one more K/V
chunk every rank already holds, attended once by the local queries. The joint queries are not
put round the ring: each rank attends them to its own chunk only; the P partials are
all-gathered and every rank merges them, after the joint-to-joint part, in rank order. Each
joint query is computed once per chunk, and every rank ends with the same bits. Key-only joint
tokens (Cosmos3's kept prompt K/V) are that one more chunk and nothing else.
"""

from __future__ import annotations

import torch

from ditserve.attention.backends import AttentionBackend, describe_call
from ditserve.attention.metadata import AttentionMetadata
from ditserve.attention.parallel.comm import all_gather_stacked, group_rank_and_size, start_ring_pass
from ditserve.attention.parallel.partials import BlockPlan, PartialSum, attend_block
from ditserve.attention.parallel.split import Joint, SequenceSplit, resolve_split
from ditserve.attention.parallel.wrapper import SequenceParallelAttention

__all__ = ["RingAttention"]


class RingAttention(SequenceParallelAttention):
    """Attention over a sequence split across the ranks of `group`, by passing K/V round a ring.

    `inner`: an `Attention` (its selector chooses, on group rank 0, among backends that return
    the log-sum-exp), a backend name or None ('auto'), or an `AttentionBackend`; one that cannot
    return the log-sum-exp raises `AttentionBackendError` here. Inputs and outputs as
    `UlyssesAttention`: each rank's local slice and the `SequenceSplit` describing it.
    """

    needs_lse = True

    def _run(
        self, joint: Joint | None, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, split: SequenceSplit | None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        rank, size = group_rank_and_size(self.group)
        split = resolve_split(split, query, rank, size)
        split.check_inputs(query, key, value, joint)
        scale = self.scale if self.scale is not None else query.shape[-1] ** -0.5
        # One choice per forward, from the local call every rank shares (its chunks differ only in padding).
        local = AttentionMetadata.dense_for(query, key) if split.local_metadata is None else split.local_metadata.filled(query, key)
        backend = self.backends.backend_for(describe_call(query, key, value, local), query.device, (query, key, value, local, scale))

        acc = PartialSum(query.shape[:-1], value.shape[-1], query.dtype, query.device)
        if joint is not None:
            _add(acc, backend, query, joint[1], joint[2], split.joint_key_plan, scale)
        joint_queries = joint is not None and joint[0] is not None
        joint_own = None
        held = (key.contiguous(), value.contiguous())
        for step in range(size):
            if step + 1 < size:
                incoming, works = start_ring_pass(held, self.group)
            _add(acc, backend, query, held[0], held[1], split.ring_plans[(rank - step) % size], scale)
            if step == 0 and joint_queries:
                joint_own = PartialSum(joint[0].shape[:-1], value.shape[-1], query.dtype, query.device)
                _add(joint_own, backend, joint[0], held[0], held[1], split.joint_query_plans[1], scale)
            if step + 1 < size:
                for work in works:
                    work.wait()
                held = incoming
        out = split.zero_padding(acc.result(query.dtype))
        if not joint_queries:
            return None, out
        return self._joint_output(backend, joint, joint_own, split, scale), out

    def _joint_output(
        self, backend: AttentionBackend, joint: Joint, own: PartialSum, split: SequenceSplit, scale: float
    ) -> torch.Tensor:
        """Joint queries over the joint keys and every rank's chunk, merged in rank order on every rank."""
        own_out, own_lse = own.totals()
        outs, lses = all_gather_stacked(own_out, self.group), all_gather_stacked(own_lse, self.group)
        jq, jk, jv = joint
        acc = PartialSum(jq.shape[:-1], jv.shape[-1], jq.dtype, jq.device)
        _add(acc, backend, jq, jk, jv, split.joint_query_plans[0], scale)
        for r in range(split.world_size):
            acc.add(outs[r], lses[r])
        return acc.result(jq.dtype)

    def extra_repr(self) -> str:
        return f"backend={self.backends.name!r}, scale={self.scale}"


def _add(
    acc: PartialSum, backend: AttentionBackend, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: BlockPlan, scale: float
) -> None:
    if not plan.empty:
        out, lse = attend_block(backend, query, key, value, plan, scale)
        acc.add(out, lse, plan.q_rows)
