"""`python -m ditserve.rayserve.follower RANK SPEC`: one of a replica's ranks beyond 0 (`replica_ranks`).

It joins the replica's process group, loads the same model, and follows rank 0's steps until rank 0
stops it. It ends itself when its replica's process has gone (its parent changes): a replica that
Ray kills leaves no rank behind.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

__all__ = ["main"]

WATCH_S = 0.5


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(WATCH_S)


def main(argv: list[str] | None = None) -> int:
    rank_arg, spec_arg = sys.argv[1:3] if argv is None else argv
    rank, spec = int(rank_arg), json.loads(spec_arg)
    threading.Thread(target=_watch_parent, args=(spec["parent"],), name="ditserve-parent-watch", daemon=True).start()
    logging.basicConfig(level=spec["log_level"].upper(), format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s")

    import torch

    from ditserve.distributed import ParallelLayout, build_groups
    from ditserve.rayserve.replica_ranks import client_store, join_ranks
    from ditserve.server.main import follow_rank_zero

    torch.set_num_threads(spec["threads"])
    layout = ParallelLayout(*spec["layout"])
    device = join_ranks(layout, rank, client_store(spec["port"], layout.world), spec["device_type"])
    groups = build_groups(layout, rank)
    load = dict(spec["load"])
    if device is not None:
        load["device"] = device
    return follow_rank_zero(spec["model"], load, groups)


if __name__ == "__main__":
    sys.exit(main())
