"""Running a test's worker on several real processes (spawned, gloo on CPU), with no hangs.

A worker takes its rank first, then `args`; an exception on any rank stops the others and is
raised here with its traceback; ranks still running at `timeout_s` (a hang in a collective) are
killed and reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["run_ranks"]


def run_ranks(worker: Callable[..., None], world: int, args: Sequence[Any], timeout_s: float) -> None:
    context = torch.multiprocessing.start_processes(worker, args=tuple(args), nprocs=world, join=False,
                                                    start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks did not finish in {timeout_s} s (a hang in a collective?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
