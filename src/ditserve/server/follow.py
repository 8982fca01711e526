"""A server's rank other than 0 at run time: follow rank 0's steps until it stops, or end at once when a rank died.

The follower's loop runs on a thread and the main thread only waits, so that signals are handled
while the loop is blocked in a collective (a Python handler runs on the main thread, between
bytecodes; a collective with a rank that died may never return on NCCL). torchrun sends SIGTERM
to the survivors when a rank dies: then this rank logs which one and exits 1 at once
(`os._exit`: its own thread may be blocked for good). A SIGTERM or SIGINT with every rank alive is
an orchestrator's or a terminal's stop, sent to every process: ignored here, since rank 0 shuts
down and tells the followers, which end with it. A collective that fails on this rank (gloo: a
peer's socket closed) ends it the same way when a rank has died.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import NoReturn

from ditserve.engine.coordination import DEATH_GRACE_S, Follower
from ditserve.engine.errors import RanksLost
from ditserve.ranks import dead_ranks

__all__ = ["follow"]

log = logging.getLogger("ditserve.server")


def follow(follower: Follower, rank: int) -> int:
    """Run `follower` until rank 0 stops it; the exit status (0). Exits the process (1) when a rank died;
    raises what the loop raised otherwise."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            follower.run()
        except BaseException as e:  # noqa: BLE001 -- raised again on the main thread
            failed.append(e)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        ranks = dead_ranks()
        if ranks:
            _exit_lost(rank, RanksLost(ranks))

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    thread = threading.Thread(target=run, name="ditserve-follower", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if failed:
        ranks = dead_ranks(DEATH_GRACE_S)
        if ranks:
            _exit_lost(rank, RanksLost(ranks))
        raise failed[0]
    log.info("rank %d: followed %d steps; rank 0 has shut down", rank, follower.steps)
    return 0


def _exit_lost(rank: int, error: RanksLost) -> NoReturn:
    log.error("rank %d: %s; stopping (every step needs every rank)", rank, error)
    logging.shutdown()
    os._exit(1)
