"""A replica on several GPUs: the replica's own process is rank 0 and starts the other ranks itself.

`ditserve serve --ray --num-gpus N` gives each replica N GPUs (Ray sets CUDA_VISIBLE_DEVICES to them)
and splits its steps over N ranks as `ditserve serve --num-gpus N` does on one host: the replica's
process is rank 0, whose engine leads every step (`engine.coordination.Leader`), and it starts ranks
1..N-1 as child processes (`python -m ditserve.rayserve.follower`) that join one torch.distributed
group over loopback and follow each step. Rank 0 watches its children: one that ends (while joining
or later) ends the replica as a whole, at once, naming the rank and its exit status, rather than
waiting for a collective with it to fail (on NCCL one may block until its watchdog fires). To Ray
and the job hub that is a replica death: its jobs are re-queued and Serve starts a new replica. A
child whose replica has gone ends itself (it watches its parent process).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ditserve.distributed import NO_MULTICAST_ENV, ParallelLayout
from ditserve.ranks import poll_dead

__all__ = ["JOIN_TIMEOUT_S", "ReplicaRanks", "join_ranks", "end_process"]

log = logging.getLogger("ditserve.rayserve")

JOIN_TIMEOUT_S = 300.0  # every rank must have joined by then (a child that failed to start fails the replica)
WATCH_S = 0.2


def join_ranks(layout: ParallelLayout, rank: int, store: dist.Store, device_type: str) -> torch.device | None:
    """Join the replica's process group through `store` (rank 0 hosts it); this rank's device
    (`cuda:rank` among the replica's GPUs, None off CUDA)."""
    device = None
    if device_type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=store, rank=rank,
                            world_size=layout.world)
    return device


def client_store(port: int, world: int) -> dist.Store:
    """A follower's connection to its replica's store."""
    return dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=JOIN_TIMEOUT_S))


def end_process(reason: str) -> None:
    """End this process at once (a replica whose ranks cannot step together any more)."""
    log.error("%s; ending the replica so that Serve replaces it", reason)
    logging.shutdown()
    os._exit(1)


class ReplicaRanks:
    """Ranks 1..N-1 of one replica, as child processes following its rank 0 (this process)."""

    def __init__(self, model: str, load: dict[str, Any], layout: ParallelLayout, device_type: str, threads: int,
                 log_level: str = "info", on_rank_ended: Callable[[str], None] = end_process) -> None:
        self.layout = layout
        self.device_type = device_type
        # the store first, on a port it picks itself, so the children are started with a port that is ours
        self._store = dist.TCPStore("127.0.0.1", 0, layout.world, is_master=True, wait_for_workers=False,
                                    timeout=timedelta(seconds=JOIN_TIMEOUT_S))
        env = {**os.environ, **NO_MULTICAST_ENV, "OMP_NUM_THREADS": str(threads)}
        spec = json.dumps({"model": model, "load": load, "layout": [layout.samples, layout.ulysses, layout.ring],
                           "port": self._store.port, "parent": os.getpid(), "device_type": device_type,
                           "threads": threads, "log_level": log_level})
        self.children = {rank: subprocess.Popen([sys.executable, "-m", "ditserve.rayserve.follower", str(rank), spec],
                                                env=env)
                         for rank in range(1, layout.world)}
        self._closing = threading.Event()
        self._on_rank_ended = on_rank_ended
        threading.Thread(target=self._watch, name="ditserve-ranks-watch", daemon=True).start()

    def join(self) -> tuple[Any, torch.device | None]:
        """Join as rank 0 (blocks until every child has joined); (the groups `build_groups` gives, this
        rank's device)."""
        from ditserve.distributed import build_groups

        device = join_ranks(self.layout, 0, self._store, self.device_type)
        return build_groups(self.layout, 0), device

    def _ended(self) -> dict[int, int]:
        """Rank -> exit status of the children that have ended."""
        return {rank: child.returncode for rank, child in self.children.items() if child.poll() is not None}

    def _watch(self) -> None:
        while not self._closing.wait(WATCH_S):
            ended = self._ended()
            if ended and not self._closing.is_set():
                self._on_rank_ended("rank(s) " + ", ".join(f"{rank} (exit status {code})" for rank, code in ended.items())
                                    + " of this replica ended")
                return

    def dead(self, grace_s: float = 0.0) -> list[int]:
        """The ranks whose process has ended; looks again until `grace_s` has passed if none has yet."""
        return poll_dead(lambda: sorted(self._ended()), grace_s)

    def stop_watching(self) -> None:
        """The replica is stopping: its children ending is expected from now on."""
        self._closing.set()

    def close(self, timeout_s: float = 10.0) -> None:
        """Wait for the children to end (rank 0's engine has told them to stop), then kill any left."""
        self._closing.set()
        deadline = time.monotonic() + timeout_s
        for child in self.children.values():
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
