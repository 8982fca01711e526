"""Plain-math attention: the correctness reference (any float dtype, float64 included)."""

from __future__ import annotations

import torch

from ditserve.attention.backends.base import AttentionBackend, Capabilities
from ditserve.attention.backends.per_sample import per_sample
from ditserve.attention.metadata import AttentionMetadata


def dense_attention_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    *,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v on `[batch, seq, heads, dim]`, computed in at least float32.

    With `return_lse`, also the log-sum-exp of each query's scores, `[batch, seq, heads]` in the
    compute dtype (-inf where a query sees no key): what merging partial results needs.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[2] // k.shape[2]
    qf = q.to(compute).transpose(1, 2)
    kf = k.to(compute).repeat_interleave(group, dim=2).transpose(1, 2)
    vf = v.to(compute).repeat_interleave(group, dim=2).transpose(1, 2)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    sq, sk = scores.shape[-2:]
    if causal:  # bottom-right aligned: query i sees keys j <= i + (sk - sq)
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(compute)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows give zeros, not NaN
    out = torch.matmul(probs, vf).transpose(1, 2).to(q.dtype)
    if not return_lse:
        return out
    return out, torch.logsumexp(scores, dim=-1).transpose(1, 2)


class ReferenceBackend(AttentionBackend):
    """Readable and exact; slow. Packed batches run sample by sample from host-side lengths.

    Returns the log-sum-exp on request, so ring attention can run on it (and on CPU).
    """

    name = "reference"
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda", "mps", "xpu"}),
        dtypes=frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16}),
        packed=True,
        masks=True,
        returns_lse=True,
    )

    def forward(
        self, query, key, value, metadata: AttentionMetadata, scale: float, return_lse: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not metadata.packed:
            return dense_attention_math(query, key, value, scale, metadata.causal, metadata.attn_mask, return_lse=return_lse)
        return per_sample(lambda q, k, v: dense_attention_math(q, k, v, scale, metadata.causal, return_lse=return_lse),
                          query, key, value, metadata, return_lse)
