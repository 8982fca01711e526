"""The family-agnostic core: requests as data, and the engine that runs them.

`request`: `RequestSpec` (a family's declared parameters) and `GenerationRequest`;
`family`: the `Family` protocol the engine drives, `GuidancePlan`, `Prepared`, `Sample`;
`batching`: the continuous-batching engine (many requests, one step of the model per
step), with its step `policy`, token `budget` and VAE `decoder`. This package imports no
pipeline and no model: families build on it, not the other way round.
"""

from ditserve.engine.errors import (
    EngineClosed,
    GenerationCancelled,
    InvalidRequest,
    RanksLost,
)
from ditserve.engine.request import MAX_SEED, GenerationRequest, Param, RequestSpec
from ditserve.engine.result import GenerationOutput

__all__ = [
    "MAX_SEED",
    "EngineClosed",
    "GenerationCancelled",
    "GenerationOutput",
    "GenerationRequest",
    "InvalidRequest",
    "Param",
    "RanksLost",
    "RequestSpec",
]
