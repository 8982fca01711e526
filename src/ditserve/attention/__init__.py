"""ditserve's attention layer: explicit metadata, one registry of backends, a shape-aware selector."""

from ditserve.attention.backends import BACKEND_FACTORIES, AttentionBackend, AttentionBackendError, AttentionCall, Capabilities
from ditserve.attention.layer import Attention, run_attention_eagerly
from ditserve.attention.metadata import AttentionMetadata
from ditserve.attention.selector import ENV_VAR, AttentionSelector, resolve_backend_name

__all__ = [
    "BACKEND_FACTORIES",
    "ENV_VAR",
    "Attention",
    "AttentionBackend",
    "AttentionBackendError",
    "AttentionCall",
    "AttentionMetadata",
    "AttentionSelector",
    "Capabilities",
    "resolve_backend_name",
    "run_attention_eagerly",
]
