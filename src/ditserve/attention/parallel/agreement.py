"""Ranks agree on one attention backend: group rank 0 chooses, every rank runs that choice.

A rank deciding alone could choose differently from the others (`auto` times the kernels, and
timings vary from GPU to GPU), and two kernels give slightly different numbers for the same
tokens, so the slices of one sequence would be computed by different maths. Rank 0 decides
once per call shape and broadcasts the name; the memo lives in this object, and because every
rank makes the same calls in the same order, the broadcasts line up without extra bookkeeping.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed import ProcessGroup

from ditserve.attention.backends import AttentionBackend, AttentionBackendError, AttentionCall, create_backends
from ditserve.attention.layer import Attention
from ditserve.attention.parallel.comm import broadcast_from_first, group_rank_and_size
from ditserve.attention.selector import FALLBACK_ORDER, AttentionSelector

__all__ = ["AgreedBackends", "agree_on_choice", "lse_backend_names"]

_MEMO_LIMIT = 4096  # packed batches of many sizes: keep the memo small (same limit, same moment, on every rank)


def agree_on_choice(choice: Any, group: ProcessGroup | None = None) -> Any:
    """Group rank 0's `choice` (e.g. a backend name its selector picked), returned on every rank.

    Every rank of `group` must call it at the same point; the other ranks' `choice` is ignored.
    """
    return broadcast_from_first(choice, group)


def lse_backend_names() -> list[str]:
    """Registered backends that can return the log-sum-exp (what ring attention merges by)."""
    return [name for name, backend in create_backends().items() if backend.capabilities.returns_lse]


def _preference(name: str) -> int:
    return FALLBACK_ORDER.index(name) if name in FALLBACK_ORDER else len(FALLBACK_ORDER)


class AgreedBackends:
    """The inner backend of a parallel wrapper, chosen on group rank 0 and used by every rank.

    `inner` is an `Attention` (its selector decides on rank 0), a backend name or None
    ('auto'), or an `AttentionBackend` instance (pinned: nothing to agree on). With
    `needs_lse`, only backends that return the log-sum-exp are acceptable: `auto` times those
    that can serve the call (returning it) and takes the fastest; a pinned one that cannot is
    refused at once.
    """

    def __init__(self, inner: Attention | AttentionBackend | str | None, group: ProcessGroup | None, *, needs_lse: bool) -> None:
        self.group = group
        self.needs_lse = needs_lse
        self._fixed = inner if isinstance(inner, AttentionBackend) else None
        self._selector = None
        if self._fixed is None:
            self._selector = inner.selector if isinstance(inner, Attention) else AttentionSelector(inner)
        self._backends = create_backends()
        self._memo: dict[tuple[AttentionCall, torch.device], AttentionBackend] = {}
        if needs_lse and self.name != "auto":  # a pinned backend that cannot return it is refused now, not mid-forward
            pinned = self._fixed if self._fixed is not None else self._backends[self.name]
            if not pinned.capabilities.returns_lse:
                raise AttentionBackendError(_no_lse_message(self.name, lse_backend_names()))

    @property
    def name(self) -> str:
        return self._fixed.name if self._fixed is not None else self._selector.name

    @property
    def choices(self) -> list[str]:
        """The backend agreed for each call shape seen so far (for logs and tests)."""
        return [backend.name for backend in self._memo.values()]

    def backend_for(self, call: AttentionCall, device: torch.device, inputs: tuple) -> AttentionBackend:
        """The backend every rank uses for `call`; `inputs` = (q, k, v, metadata, scale) for `auto` trials.

        Collective on first sight of a call shape: every rank of the group must call it.
        """
        if self._fixed is not None:
            reason = self._fixed.why_not(call, device)
            if reason is not None:
                raise AttentionBackendError(f"attention backend {self._fixed.name!r} cannot serve this call: {reason}")
            return self._fixed
        key = (call, device)
        found = self._memo.get(key)
        if found is not None:
            return found
        rank, _ = group_rank_and_size(self.group)
        decision = self._decide(call, device, inputs) if rank == 0 else None
        ok, value = agree_on_choice(decision, self.group)
        if not ok:
            raise AttentionBackendError(value)  # the same error on every rank: none is left waiting
        backend = self._backends[value]
        reason = backend.why_not(call, device)
        if reason is not None:
            raise AttentionBackendError(f"rank {rank} cannot run attention backend {value!r}, which group rank 0 chose: {reason}")
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        self._memo[key] = backend
        return backend

    def _decide(self, call: AttentionCall, device: torch.device, inputs: tuple) -> tuple[bool, str]:
        """(True, backend name) or (False, error message), on group rank 0."""
        try:
            if not self.needs_lse:
                return True, self._selector.backend_for(call, device, inputs).name
            able = sorted(
                (name for name, b in self._backends.items() if b.capabilities.returns_lse and b.why_not(call, device) is None),
                key=_preference,
            )
            if self._selector.name == "auto":
                if not able:
                    raise AttentionBackendError(
                        f"ring attention needs a backend that returns the log-sum-exp and none can serve this call; "
                        f"backends that return it: {lse_backend_names()}"
                    )
                return True, self._selector.fastest(call, device, inputs, needs_lse=True).name
            reason = self._backends[self._selector.name].why_not(call, device)
            if reason is not None:
                raise AttentionBackendError(
                    f"attention backend {self._selector.name!r} cannot serve this ring call: {reason}. "
                    f"Backends that can and return the log-sum-exp: {able or 'none'}"
                )
            return True, self._selector.name
        except Exception as exc:  # noqa: BLE001 -- whatever rank 0 hit (a kernel's trial too), every rank raises it
            return False, f"{type(exc).__name__}: {exc}" if not isinstance(exc, (AttentionBackendError, ValueError)) else str(exc)


def _no_lse_message(name: str, able: list[str]) -> str:
    return (
        f"ring attention merges partial results by their log-sum-exp, and attention backend {name!r} cannot "
        f"return it (Capabilities.returns_lse). Backends that can: {able or 'none'}; or use Ulysses attention, "
        f"which works with any backend"
    )

