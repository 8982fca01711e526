"""`python -m ditserve.torchrun LABEL <torchrun arguments>`: torchrun, with a failed run told in one line.

`ditserve generate/serve --num-gpus N` start their ranks through this (`ditserve.distributed.launch`).
torchrun's agent watches the ranks and, when one ends badly, stops the others and raises
`ChildFailedError` naming every failure; uncaught, that is a page of traceback. Here its first
failure (the root cause: the rank that died, not the ones torchrun then stopped) becomes
`LABEL: error: rank 1 died (killed by SIGKILL); the other ranks were stopped`, and the exit status 1.
"""

from __future__ import annotations

import sys

__all__ = ["describe_failure", "main"]


def describe_failure(rank: int, exitcode: int, signal_name: str) -> str:
    """How a rank ended, for people: killed by a signal (a negative exit code) or an exit status."""
    if exitcode < 0:
        return f"rank {rank} died (killed by {signal_name})"
    return f"rank {rank} failed (exit status {exitcode})"


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    label, *args = sys.argv[1:] if argv is None else argv
    try:
        torchrun(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"{label}: error: {describe_failure(rank, failure.exitcode, failure.signal_name())}; the other ranks "
              "were stopped", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
