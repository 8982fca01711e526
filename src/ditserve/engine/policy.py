"""Which queued requests join the running batch at a step boundary: FIFO with a token budget.

Time is counted in denoising steps: every active request advances one step per batched
forward, so a request with `r` steps left leaves the batch exactly `r` boundaries from now.
That makes a starvation-free policy with a bounded bypass easy to state and to check:

1. FIFO: the head of the queue joins as soon as it fits (the batch's tokens plus its own
   stay within `max_tokens`, and the batch holds fewer than `max_requests`). Requests join
   in queue order while they fit.
2. A request bigger than the whole budget joins only an empty batch, and then runs alone
   (nothing fits beside it).
3. Bounded bypass (backfill, as in EASY backfilling of HPC batch schedulers): when the head
   does not fit, it gets a reservation: the first boundary `R` at which enough active
   requests will have left for it to fit. A later request may join ahead of it only if it
   fits now AND needs at most `R` steps, so it has left by the head's reservation. The
   head therefore joins no later than boundary R, the step at which it would join under
   strict FIFO if nothing left early (a request cancelled early could have let it in
   sooner without the bypass); in wall time each step may take a little longer while the
   bypassing request runs.
   Only the head holds a reservation; every other queued request is behind it in FIFO order
   and cannot join before boundary R either, by which time every bypasser has left.

Everything here is pure: sizes and step counts in, queue positions out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Slot", "plan_admission", "reservation"]


@dataclass(frozen=True)
class Slot:
    """One request as the policy sees it: tokens per step (all its samples) and steps (left)."""

    tokens: int
    steps: int


def _fits(used_tokens: int, used_requests: int, tokens: int, max_tokens: int, max_requests: int | None) -> bool:
    if max_requests is not None and used_requests + 1 > max_requests:
        return False
    return used_requests == 0 or used_tokens + tokens <= max_tokens


def reservation(active: Sequence[Slot], head: Slot, max_tokens: int, max_requests: int | None) -> int:
    """Boundaries from now until `head` fits, assuming active requests leave as they finish."""
    used_tokens = sum(slot.tokens for slot in active)
    used_requests = len(active)
    if _fits(used_tokens, used_requests, head.tokens, max_tokens, max_requests):
        return 0
    for slot in sorted(active, key=lambda s: s.steps):  # the earliest leavers first
        used_tokens -= slot.tokens
        used_requests -= 1
        if _fits(used_tokens, used_requests, head.tokens, max_tokens, max_requests):
            return slot.steps
    raise AssertionError("an empty batch always fits")  # pragma: no cover


def plan_admission(
    active: Sequence[Slot],
    queue: Sequence[Slot],
    max_tokens: int,
    max_requests: int | None = None,
    *,
    backfill: bool = True,
) -> list[int]:
    """Positions in `queue` (oldest first) that join now, in the order they join.

    `active`: the requests in the batch (steps = steps left); `queue`: waiting requests
    (steps = their step counts). `max_requests` None: no limit besides tokens. With
    `backfill=False` this is strict FIFO (no request ever passes the head).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_requests is not None and max_requests < 1:
        raise ValueError(f"max_requests must be >= 1 or None, got {max_requests}")
    batch = list(active)
    used_tokens = sum(slot.tokens for slot in batch)
    admitted: list[int] = []
    position = 0
    while position < len(queue) and _fits(used_tokens, len(batch), queue[position].tokens, max_tokens, max_requests):
        batch.append(queue[position])
        used_tokens += queue[position].tokens
        admitted.append(position)
        position += 1
    if not backfill or position >= len(queue):
        return admitted
    deadline = reservation(batch, queue[position], max_tokens, max_requests)
    for later in range(position + 1, len(queue)):
        slot = queue[later]
        if slot.steps <= deadline and _fits(used_tokens, len(batch), slot.tokens, max_tokens, max_requests):
            batch.append(slot)
            used_tokens += slot.tokens
            admitted.append(later)
    return admitted
