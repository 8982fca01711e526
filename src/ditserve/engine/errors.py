"""Errors the engine raises for a request or for its own state."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["EngineClosed", "GenerationCancelled", "InvalidRequest", "RanksLost", "StepInterrupted"]


class InvalidRequest(ValueError):
    """A request field is out of range or of the wrong type. `field` names it (for HTTP 400s)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class GenerationCancelled(Exception):
    """The request's cancel token was set before a denoising step (or between blocks of one);
    nothing was decoded or written."""

    def __init__(self, step: int, total_steps: int) -> None:
        super().__init__(f"generation cancelled before denoising step {step + 1} of {total_steps}")
        self.step = step
        self.total_steps = total_steps


class EngineClosed(RuntimeError):
    """`submit` after `close` / `stop`: the engine takes no new requests."""


class StepInterrupted(Exception):
    """A model stopped a forward between two of its blocks because every request in the step was
    cancelled (or the engine is shutting down); the engine ends those requests as cancelled."""

    def __init__(self, block: int, blocks: int) -> None:
        super().__init__(f"step interrupted before block {block + 1} of {blocks}")
        self.block = block
        self.blocks = blocks


class RanksLost(RuntimeError):
    """A rank of an engine on several ranks died (`ranks`), or the ranks stopped answering each other
    (`ranks` empty): every step needs every rank, so no request can advance any more, on any rank."""

    def __init__(self, ranks: Sequence[int], detail: str = "") -> None:
        self.ranks = tuple(ranks)
        if self.ranks:
            message = f"rank {', '.join(map(str, self.ranks))} died"
        else:
            message = f"the ranks stopped answering each other ({detail or 'a collective failed'})"
        super().__init__(message)
