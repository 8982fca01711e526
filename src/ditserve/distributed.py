"""Running one generation on several ranks: torchrun's environment -> process groups -> `Pipeline.parallelize`.

Under `torchrun --nproc_per_node N`, each process reads its rank from the environment, joins the
default group (NCCL on CUDA, gloo on the CPU) and takes GPU `LOCAL_RANK`. The N ranks form a grid
of `samples x sequence`: ranks `s * sequence ... (s + 1) * sequence - 1` share one sequence group
(Ulysses inside the DiT), and ranks with the same position in their sequence group share one
sample group (CFG parallelism). Every rank runs the same generation; rank 0 writes the result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["ParallelLayout", "build_groups", "init_from_environment"]


@dataclass(frozen=True)
class ParallelLayout:
    """How many ranks divide each step's samples (CFG parallelism) and each forward's tokens (Ulysses)."""

    samples: int = 1
    sequence: int = 1

    def __post_init__(self) -> None:
        for name in ("samples", "sequence"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} parallel degree must be an int >= 1, got {value!r}")

    @property
    def world(self) -> int:
        return self.samples * self.sequence


def init_from_environment(layout: ParallelLayout, device_type: str) -> tuple[int, torch.device | None]:
    """Join torchrun's process group; (this rank, its device: `cuda:LOCAL_RANK` on CUDA, else None).

    Raises `ValueError` when not started by torchrun or when the world size is not the layout's.
    """
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise ValueError(f"{layout.world} ranks are needed: start with `torchrun --nproc_per_node {layout.world} "
                         "-m ditserve ...`")
    world = int(os.environ["WORLD_SIZE"])
    if world != layout.world:
        raise ValueError(f"--cfg-parallel {layout.samples} x --sequence-parallel {layout.sequence} = {layout.world} "
                         f"ranks, but torchrun started {world}")
    device = None
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), device


def build_groups(layout: ParallelLayout, rank: int) -> tuple[Any, Any]:
    """(sample group, sequence group) of `rank`, each None when its degree is 1. Every rank must call
    this, in the same order (creating a group is collective)."""
    sequence_groups = [dist.new_group(list(range(s * layout.sequence, (s + 1) * layout.sequence)))
                       for s in range(layout.samples)]
    sample_groups = [dist.new_group(list(range(q, layout.world, layout.sequence))) for q in range(layout.sequence)]
    return (sample_groups[rank % layout.sequence] if layout.samples > 1 else None,
            sequence_groups[rank // layout.sequence] if layout.sequence > 1 else None)
