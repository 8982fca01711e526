"""One engine on several ranks: rank 0 decides every step, the other ranks follow it.

A server on several GPUs takes requests on rank 0 only, so the ranks cannot each run their own
engine as `generate` does (SPMD on the same calls). Instead rank 0's engine (`Leader`) publishes a
`StepPlan` before each forward: the requests active now (by key), the requests that joined since
the last plan (the validated request itself), and the requests that advance, in order. Every
other rank (`Follower`) keeps the same per-request state (the same `prepare` of the same request
gives the same noise, text and scheduler), drops what the plan no longer lists, and runs the same
step (`advance`), so the collectives inside the model (Ulysses) and the family (CFG parallelism)
meet. Only rank 0 decodes. Steps are never interrupted between blocks here: ranks must leave a
step together.

A rank that dies ends it all: every step needs every rank. When a collective fails, the leader asks
torchrun's worker processes whether a rank has died (`ditserve.ranks`); if one has, it is lost
(`RanksLost`): it runs no collective again (one with a dead rank would fail or, on NCCL, hang), the
engine fails its requests with that error, and `on_lost` tells the server. The server also calls
`abandon` itself when torchrun's SIGTERM finds a rank dead before any collective failed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from ditserve.engine.errors import RanksLost, StepInterrupted
from ditserve.engine.family import Family, Prepared
from ditserve.engine.request import GenerationRequest
from ditserve.engine.step import advance
from ditserve.ranks import dead_ranks

__all__ = ["Follower", "Leader", "StepPlan"]

log = logging.getLogger("ditserve.engine")

# How long a failed collective waits for torchrun's workers to show a dead rank (the failure can come the
# moment a dying peer's sockets close, a moment before it has exited)
DEATH_GRACE_S = 2.0


@dataclass(frozen=True)
class StepPlan:
    """What every rank does at one step (see the module docstring); `stop` ends the followers."""

    active: tuple[int, ...] = ()
    joining: dict[int, GenerationRequest] = field(default_factory=dict)
    advancing: tuple[int, ...] = ()
    stop: bool = False


def _source(group: dist.ProcessGroup | None) -> int:
    return dist.get_global_rank(group, 0) if group is not None else 0


class Leader:
    """Rank 0's side: the engine hands it each step's plan, which it broadcasts. `lost`: set once a rank
    died (see the module docstring); `on_lost(error)` is called once then, from the thread that found out.
    `dead_ranks(grace_s)`: the ranks that have died (default: torchrun's workers, `ditserve.ranks`; a Ray
    replica that starts its own ranks passes its own)."""

    def __init__(self, group: dist.ProcessGroup | None = None,
                 dead_ranks: Callable[[float], list[int]] = dead_ranks) -> None:
        self.group = group
        self._dead_ranks = dead_ranks
        self._published: set[int] = set()
        self.lost: RanksLost | None = None
        self.on_lost: Callable[[RanksLost], None] | None = None

    def publish(self, active: dict[int, GenerationRequest], advancing: Sequence[int]) -> None:
        """Broadcast the step's plan. Raises `RanksLost` if the ranks are lost or the broadcast fails (the
        ranks can no longer agree on a step, whichever rank is at fault)."""
        joining = {key: request for key, request in active.items() if key not in self._published}
        self._published = set(active)
        self._broadcast(StepPlan(tuple(active), joining, tuple(advancing)))

    def stop(self) -> None:
        """Tell the followers to end (nothing to tell once the ranks are lost)."""
        if self.lost is not None:
            return
        try:
            self._broadcast(StepPlan(stop=True))
        except RanksLost as e:
            log.warning("the followers were not told to stop: %s", e)

    def explain(self, error: BaseException) -> BaseException:
        """What a failed step's `error` means: `RanksLost` if a rank has died (the leader is then lost),
        else `error` itself (a failure of the step's own requests)."""
        if self.lost is None:
            ranks = self._dead_ranks(DEATH_GRACE_S)
            if ranks:
                self.abandon(RanksLost(ranks))
        return self.lost or error

    def abandon(self, error: RanksLost) -> None:
        """The ranks are lost: run no collective again, and tell `on_lost` (once)."""
        if self.lost is not None:
            return
        self.lost = error
        log.error("%s: no step can run on the ranks any more", error)
        if self.on_lost is not None:
            self.on_lost(error)

    def _broadcast(self, plan: StepPlan) -> None:
        if self.lost is not None:
            raise self.lost
        try:
            dist.broadcast_object_list([plan], src=_source(self.group), group=self.group)
        except Exception as e:
            lost = self.explain(e)
            if not isinstance(lost, RanksLost):
                self.abandon(lost := RanksLost((), f"{type(e).__name__}: {e}"))
            raise lost from e


@dataclass
class _State:
    prepared: Prepared
    latents: Tensor
    step: int = 0


class Follower:
    """Another rank's side: receive each plan and run the same step, until the leader stops. `run` raises
    `RanksLost` when a step failed because a rank died, and what a failed broadcast of the plan raised."""

    def __init__(self, family: Family, group: dist.ProcessGroup | None = None) -> None:
        self.family = family
        self.group = group
        self.states: dict[int, _State] = {}
        self.steps = 0

    def run(self) -> None:
        with torch.no_grad():
            while True:
                box: list[StepPlan | None] = [None]
                dist.broadcast_object_list(box, src=_source(self.group), group=self.group)
                plan = box[0]
                if plan is None or plan.stop:
                    return
                self.apply(plan)

    def apply(self, plan: StepPlan) -> None:
        for key in [k for k in self.states if k not in plan.active]:
            del self.states[key]
        if plan.joining:
            keys = list(plan.joining)
            for key, prepared in zip(keys, self.family.prepare_batch([plan.joining[k] for k in keys])):
                self.states[key] = _State(prepared, prepared.latents)
        if not plan.advancing:  # an idle leader's heartbeat
            return
        steps = [(self.states[k].prepared, self.states[k].latents, self.states[k].step) for k in plan.advancing]
        try:
            stepped = advance(self.family, steps)
        except StepInterrupted:  # never asked here; kept for symmetry with the leader
            return
        except Exception as e:  # the leader's forward failed the same way; its requests are gone there too
            ranks = dead_ranks(DEATH_GRACE_S)
            if ranks:  # unless a rank died under the step: then no step can run again
                raise RanksLost(ranks) from e
            log.exception("a followed step failed; dropping its requests")
            for key in plan.advancing:
                self.states.pop(key, None)
            return
        for key, latents in zip(plan.advancing, stepped):
            state = self.states[key]
            state.latents, state.step = latents, state.step + 1
            if state.step == len(state.prepared.timesteps):
                del self.states[key]
        self.steps += 1
