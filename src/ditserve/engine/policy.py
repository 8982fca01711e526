"""Which admitted requests advance at a step: least remaining work first, filled up, no starvation.

Every admitted request has its own latents and schedule, so it can sit out a step without
changing its result. At each step boundary the engine therefore chooses the requests that
advance together in one forward:

1. Order: a request passed over for `max_skipped` steps in a row comes first (oldest
   admission first among those); then least remaining work, `tokens per step x steps left`,
   ties in admission order. Short jobs finish first (shortest remaining processing time, the
   order that minimises mean latency on one server), so a single frame arriving next to an
   81-frame video is done in a few short steps instead of sharing six long ones.
2. Fill: the first request always runs. Others join in that order while the step holds at
   most `fill_tokens` tokens beyond the first's own, and at most `max_tokens` in all (the
   memory budget). Below a few thousand tokens per forward a GPU is not busy, so small
   requests ride along almost for free; a big first request takes few companions, a small
   one many.
3. No starvation: a request passed over `max_skipped` times is first at the next step, so
   each admitted request advances at least once every `max_skipped + 1` steps. A request
   larger than `max_tokens` runs alone when it is first.

Admission (queue -> admitted) is FIFO up to `max_batch_size` admitted requests: with
`max_batch_size=1` the engine runs one request at a time to completion, as a server
without batching does.

Everything here is pure: sizes, steps and counts in, positions out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Candidate", "DEFAULT_FILL_TOKENS", "DEFAULT_MAX_SKIPPED", "select_step"]

DEFAULT_FILL_TOKENS = 16_384  # a step's worth of matrix work that keeps a GPU busy (sized on Wan2.1-1.3B)
DEFAULT_MAX_SKIPPED = 8


@dataclass(frozen=True)
class Candidate:
    """An admitted request as the policy sees it."""

    tokens: int  # tokens per step, all its samples (cond and uncond)
    remaining: int  # steps left
    skipped: int = 0  # steps in a row it was passed over

    @property
    def work(self) -> int:
        return self.tokens * self.remaining


def select_step(
    candidates: Sequence[Candidate],
    max_tokens: int,
    fill_tokens: int = DEFAULT_FILL_TOKENS,
    max_skipped: int = DEFAULT_MAX_SKIPPED,
) -> list[int]:
    """Positions in `candidates` (admission order) that advance this step, first one first."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if fill_tokens < 0:
        raise ValueError(f"fill_tokens must be >= 0, got {fill_tokens}")
    if max_skipped < 0:
        raise ValueError(f"max_skipped must be >= 0, got {max_skipped}")
    if not candidates:
        return []

    def priority(i: int) -> tuple[bool, int, int]:
        c = candidates[i]
        starved = c.skipped >= max_skipped
        return (not starved, 0 if starved else c.work, i)

    order = sorted(range(len(candidates)), key=priority)
    first = order[0]
    used = candidates[first].tokens
    limit = min(max_tokens, used + fill_tokens)
    chosen = [first]
    for i in order[1:]:
        if used + candidates[i].tokens <= limit:
            chosen.append(i)
            used += candidates[i].tokens
    return chosen
