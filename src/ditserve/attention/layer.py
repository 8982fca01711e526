"""`Attention`: the one module models call. Metadata comes in as an argument, never from context."""

from __future__ import annotations

import torch
from torch import nn

from ditserve.attention.backends import describe_call
from ditserve.attention.metadata import AttentionMetadata
from ditserve.attention.selector import AttentionSelector


class Attention(nn.Module):
    """softmax(q kᵀ · scale) v through the backend the selector picks for this call.

    Dense inputs are `[batch, seq, heads, head_dim]`; packed ones `[total_tokens, heads, head_dim]`
    with `metadata` from `AttentionMetadata.from_lengths`. Holds only configuration: the
    (shared) selector and the softmax scale (None = 1/sqrt(head_dim)).
    """

    def __init__(self, backend: str | None = None, *, selector: AttentionSelector | None = None, scale: float | None = None) -> None:
        super().__init__()
        if selector is not None and backend is not None:
            raise ValueError("pass either backend or selector, not both")
        self.selector = selector if selector is not None else AttentionSelector(backend)
        self.scale = scale

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, metadata: AttentionMetadata | None = None
    ) -> torch.Tensor:
        if metadata is None:
            metadata = AttentionMetadata.dense_for(query, key)
        else:
            metadata = metadata.filled(query, key)
        call = describe_call(query, key, value, metadata)
        scale = self.scale if self.scale is not None else query.shape[-1] ** -0.5
        backend = self.selector.backend_for(call, query.device, (query, key, value, metadata, scale))
        return backend.forward(query, key, value, metadata, scale)

    def extra_repr(self) -> str:
        return f"backend={self.selector.name!r}, scale={self.scale}"


def run_attention_eagerly(module: nn.Module) -> None:
    """Make every `Attention` inside `module` a graph break under torch.compile.

    Backend selection is host logic and kernels such as FA4 are opaque to dynamo, so compiled
    models call attention eagerly and fuse what lies around it. Done per instance rather than
    with a decorator on `forward`, because the decorator costs ~0.7 us on every eager call.
    """
    for child in module.modules():
        if isinstance(child, Attention) and not getattr(child.forward, "_ditserve_eager", False):
            eager = torch.compiler.disable(child.forward)
            eager._ditserve_eager = True
            child.forward = eager
