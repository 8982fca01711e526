"""The registry: every attention backend ditserve knows, by name. Optional ones may be unavailable."""

from __future__ import annotations

from collections.abc import Callable

from ditserve.attention.backends.base import AttentionBackend, AttentionBackendError, AttentionCall, Capabilities, describe_call
from ditserve.attention.backends.fa4 import FlashAttention4Backend
from ditserve.attention.backends.flash_attn import FlashAttnBackend
from ditserve.attention.backends.per_sample import PerSampleBackend
from ditserve.attention.backends.reference import ReferenceBackend
from ditserve.attention.backends.sdpa import SdpaBackend
from ditserve.attention.backends.triton_fp8 import TritonFp8Backend
from ditserve.attention.backends.varlen import VarlenBackend

__all__ = [
    "BACKEND_FACTORIES",
    "AttentionBackend",
    "AttentionBackendError",
    "AttentionCall",
    "Capabilities",
    "create_backends",
    "describe_call",
]

# name -> factory; immutable after import. Each selector makes its own instances.
BACKEND_FACTORIES: dict[str, Callable[[], AttentionBackend]] = {
    "fa4": FlashAttention4Backend,
    "flash_attn": FlashAttnBackend,
    "sdpa": SdpaBackend,
    "sdpa_cudnn": lambda: SdpaBackend("cudnn"),
    "sdpa_flash": lambda: SdpaBackend("flash"),
    "sdpa_efficient": lambda: SdpaBackend("efficient"),
    "sdpa_math": lambda: SdpaBackend("math"),
    "varlen": VarlenBackend,
    "sdpa_cudnn_per_sample": lambda: PerSampleBackend(SdpaBackend("cudnn")),
    "reference": ReferenceBackend,
    "triton_fp8": TritonFp8Backend,  # lossy: pinned only (not in the selector's FALLBACK_ORDER)
}


def create_backends() -> dict[str, AttentionBackend]:
    """Fresh instances of every registered backend (availability is probed lazily)."""
    return {name: factory() for name, factory in BACKEND_FACTORIES.items()}
