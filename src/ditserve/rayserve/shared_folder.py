"""Every replica must see the one output folder the hub writes: checked at start, not found out per job.

The hub writes a marker file with a token unique to this application into the folder's state
directory; each replica (on whatever node) looks for it there. On one host this always holds;
on several it holds only when `--output-dir` is a shared filesystem mounted at the same path on
every node, and a replica that cannot see the marker refuses to start with that reason.
"""

from __future__ import annotations

from pathlib import Path

from ditserve.server.jobdb import STATE_DIR

__all__ = ["FolderNotShared", "check_marker", "write_marker"]


class FolderNotShared(RuntimeError):
    """This node does not see the output folder the job hub writes."""


def _marker(folder: Path, token: str) -> Path:
    return folder / STATE_DIR / f"cluster-{token}"


def write_marker(folder: Path, token: str) -> None:
    """The hub's side: mark `folder` as this application's (stale markers of earlier runs are removed)."""
    state = folder / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    for old in state.glob("cluster-*"):
        old.unlink(missing_ok=True)
    _marker(folder, token).write_text(token)


def check_marker(folder: Path, token: str, node: str) -> None:
    """A replica's side: `FolderNotShared` unless this node sees the hub's marker in `folder`."""
    try:
        seen = _marker(folder, token).read_text() == token
    except OSError:
        seen = False
    if not seen:
        raise FolderNotShared(f"the output folder {folder} on node {node} is not the one the job hub writes: with "
                              "replicas on several hosts --output-dir must be a shared filesystem (NFS, a cloud "
                              "file share) mounted at the same path on every node")
