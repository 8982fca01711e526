"""What the sequence-parallel wrappers share: how they are called (`ParallelAttentionCalls`, also the
Ulysses-inside-ring hybrid's) and, for Ulysses and ring, how they are built.

Both wrap an inner attention (an `Attention`, a backend name, None for 'auto', or an
`AttentionBackend`) whose backend is chosen on group rank 0 for every rank, and both take each
rank's local slice of q/k/v with the `SequenceSplit` describing it; `forward_joint` adds tokens
held whole on every rank, `forward_joint_keys` keys held whole on every rank that have no query
(a prompt's K/V computed once and kept, as Cosmos3's). Each subclass implements `_run`, the
exchange itself, with the joint (query or None, key, value) or None.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed import ProcessGroup

from ditserve.attention.backends import AttentionBackend
from ditserve.attention.layer import Attention
from ditserve.attention.parallel.agreement import AgreedBackends
from ditserve.attention.parallel.split import Joint, SequenceSplit

__all__ = ["ParallelAttentionCalls", "SequenceParallelAttention"]


class ParallelAttentionCalls(nn.Module):
    """The calls every sequence-parallel wrapper takes; a subclass implements `_run`. `split`: a
    `SequenceSplit` for Ulysses and ring, a `HybridSplit` for the hybrid (which checks it).

    Each call is a graph break under torch.compile, as `Attention` is (`run_attention_eagerly`):
    collectives over a process group and the backend agreement are host logic that dynamo cannot
    trace, and a compiled block may be given its wrapper after compiling (`parallelize` after
    `compile`), so the break is on the methods, not set per instance.
    """

    @torch.compiler.disable
    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, split: SequenceSplit | None = None
    ) -> torch.Tensor:
        return self._run(None, query, key, value, split)[1]

    @torch.compiler.disable
    def forward_joint(
        self,
        joint_query: torch.Tensor,
        joint_key: torch.Tensor,
        joint_value: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        split: SequenceSplit | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint attention over `[joint; sequence]` per sample, the joint tokens whole on every rank.

        Returns (the whole joint output, identical on every rank; this rank's sequence output).
        """
        return self._run((joint_query, joint_key, joint_value), query, key, value, split)

    @torch.compiler.disable
    def forward_joint_keys(
        self,
        joint_key: torch.Tensor,
        joint_value: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        split: SequenceSplit | None = None,
    ) -> torch.Tensor:
        """The sequence's queries over `[joint; sequence]` keys per sample, the joint K/V whole on every
        rank and without queries of their own (a packed split needs `joint_lengths`).

        Returns this rank's sequence output, padded rows zero.
        """
        return self._run((None, joint_key, joint_value), query, key, value, split)[1]

    def _run(
        self, joint: Joint | None, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, split: SequenceSplit | None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(the joint output, None without joint queries; this rank's sequence output)."""
        raise NotImplementedError


class SequenceParallelAttention(ParallelAttentionCalls):
    """A wrapper over one group (Ulysses or ring); `needs_lse`: its backend must return the log-sum-exp."""

    needs_lse = False

    def __init__(
        self, inner: Attention | AttentionBackend | str | None = None, group: ProcessGroup | None = None, *, scale: float | None = None
    ) -> None:
        super().__init__()
        self.inner = inner if isinstance(inner, Attention) else None
        self.group = group
        self.scale = scale if scale is not None or not isinstance(inner, Attention) else inner.scale
        self.backends = AgreedBackends(inner, group, needs_lse=self.needs_lse)
