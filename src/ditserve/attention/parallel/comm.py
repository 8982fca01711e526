"""The few torch.distributed collectives the parallel wrappers use, named by what they do.

Kept in one place so that group-rank versus global-rank bookkeeping (point-to-point peers and
broadcast sources are global ranks, the wrappers think in ranks of their group) is done once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = ["all_gather_stacked", "all_to_all_stacked", "broadcast_from_first", "group_rank_and_size", "start_ring_pass"]


def group_rank_and_size(group: ProcessGroup | None) -> tuple[int, int]:
    """This process's rank in `group` (None = the default group) and the group's size."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "sequence-parallel attention needs torch.distributed initialised "
            "(torch.distributed.init_process_group) on every rank before the first call"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _global_rank(group: ProcessGroup | None, group_rank: int) -> int:
    return dist.get_global_rank(group if group is not None else dist.group.WORLD, group_rank)


def all_to_all_stacked(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """`x[p]` goes to rank p; returns `y` with `y[p]` = what rank p sent here. Dim 0 = group size."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def all_gather_stacked(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Every rank's `x`, stacked along a new dim 0 in rank order."""
    _, size = group_rank_and_size(group)
    out = x.new_empty((size,) + tuple(x.shape))
    dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group)
    return out


def broadcast_from_first(value: Any, group: ProcessGroup | None) -> Any:
    """Group rank 0's `value` (any picklable object) on every rank; the others' values are ignored."""
    box = [value]
    dist.broadcast_object_list(box, src=_global_rank(group, 0), group=group)
    return box[0]


def start_ring_pass(
    tensors: tuple[torch.Tensor, ...], group: ProcessGroup | None
) -> tuple[tuple[torch.Tensor, ...], list[dist.Work]]:
    """Send `tensors` to the next rank and receive the previous rank's into new buffers.

    Returns at once with (buffers, works): the caller computes on what it holds, then waits on
    every work before reading the buffers. The tensors sent must not be written meanwhile.
    """
    rank, size = group_rank_and_size(group)
    to_next, from_prev = _global_rank(group, (rank + 1) % size), _global_rank(group, (rank - 1) % size)
    buffers = tuple(torch.empty_like(t) for t in tensors)
    ops = [dist.P2POp(dist.isend, t, to_next, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, b, from_prev, group) for b in buffers]
    return buffers, dist.batch_isend_irecv(ops)
