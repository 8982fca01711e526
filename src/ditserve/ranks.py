"""Which ranks of this torchrun worker group have died, read from torchrun's own worker processes.

torchrun's agent starts every local rank as its child (RANK / LOCAL_RANK in the child's environment),
polls them (every 0.1 s by default) and, once one ends badly, sends SIGTERM to the rest. A rank
that gets SIGTERM, or whose collective fails, asks here whether a sibling has died: that tells "a
rank died" (fail the work, exit non-zero, at once: collectives with it never complete) from "stop"
(an orchestrator's shutdown: finish cleanly). A sibling counts as dead once it has exited, whether
torchrun has reaped it yet (gone) or not (a zombie). Outside torchrun nothing is known: no rank is
reported dead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

__all__ = ["dead_ranks", "poll_dead", "workers"]

POLL_S = 0.05


def dead_ranks(grace_s: float = 0.0) -> list[int]:
    """The global ranks of this host's torchrun workers that have exited (this one excluded), sorted.

    `grace_s`: if none has yet, look again until this many seconds have passed (a collective can fail
    the instant a peer's sockets close, a moment before the kernel shows that peer as exited)."""
    return poll_dead(_dead_now, grace_s)


def poll_dead(find: Callable[[], list[int]], grace_s: float) -> list[int]:
    """`find()`'s dead ranks; if none, `find()` again until `grace_s` seconds have passed."""
    deadline = time.monotonic() + grace_s
    while True:
        dead = find()
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(POLL_S)


def workers(agent_pid: int) -> dict[int, psutil.Process]:
    """The live (not exited) worker processes of the torchrun agent `agent_pid`, by local rank (none if the
    agent is gone)."""
    import psutil  # a dependency of accelerate, which ditserve needs

    try:
        children = psutil.Process(agent_pid).children()
    except psutil.Error:
        return {}
    found = {}
    for child in children:
        try:
            if child.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                found[int(child.environ()["LOCAL_RANK"])] = child
        except (psutil.Error, KeyError, ValueError):
            continue  # gone meanwhile, or not a worker
    return found


def _dead_now() -> list[int]:
    env = os.environ
    if "TORCHELASTIC_RUN_ID" not in env or "LOCAL_WORLD_SIZE" not in env or os.getppid() == 1:
        return []  # not a torchrun worker, or its agent is gone: nothing to compare with
    local_rank, first = int(env["LOCAL_RANK"]), int(env["RANK"]) - int(env["LOCAL_RANK"])
    alive = {local_rank, *workers(os.getppid())}
    return [first + r for r in range(int(env["LOCAL_WORLD_SIZE"])) if r not in alive]
