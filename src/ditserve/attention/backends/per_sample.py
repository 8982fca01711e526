"""A packed batch as dense kernel calls: one per run of adjacent samples of the same length.

A few long samples (the two prompts of a guided Cosmos3 step, say, which differ in length and so
cannot stack) lose nothing by running one at a time, and then the fastest dense kernel serves
them, where the packed (varlen) kernels that install here are slower ones. Samples of one length
next to each other (a model may order its pack so: FLUX does) run as one batched call. Many short
samples of different lengths lose to launch overhead, so this is one more candidate for `auto` to
measure, not a default.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch

from ditserve.attention.backends.base import AttentionBackend, AttentionCall
from ditserve.attention.metadata import AttentionMetadata


class PerSampleBackend(AttentionBackend):
    """`dense` called once per run of equal-length samples of a packed batch; the log-sum-exp too where
    `dense` returns it."""

    def __init__(self, dense: AttentionBackend) -> None:
        if not dense.capabilities.dense:
            raise ValueError(f"{dense.name} takes no dense calls")
        self.dense = dense
        self.name = f"{dense.name}_per_sample"
        caps = dense.capabilities
        self.capabilities = type(caps)(**{**caps.__dict__, "dense": False, "packed": True, "masks": False})

    def unavailable_reason(self) -> str | None:
        return self.dense.unavailable_reason()

    def device_reason(self, device: torch.device) -> str | None:
        return self.dense.device_reason(device)

    def why_not(self, call: AttentionCall, device: torch.device) -> str | None:
        reason = super().why_not(call, device)
        if reason is not None:
            return reason
        per_sample = call._replace(packed=False, batch_size=1)
        if call.causal:  # a sample may be cross-attention even where the longest query and key lengths agree
            per_sample = per_sample._replace(max_seq_len_k=call.max_seq_len_q + 1)
        return self.dense.why_not(per_sample, device)

    def forward(self, query, key, value, metadata: AttentionMetadata, scale: float, return_lse: bool = False):
        extra = {"return_lse": True} if return_lse else {}

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
            dense = AttentionMetadata(max_seq_len_q=q.shape[1], max_seq_len_k=k.shape[1], causal=metadata.causal)
            return self.dense.forward(q, k, v, dense, scale, **extra)

        return per_sample(attend, query, key, value, metadata, return_lse)


def per_sample(attend: Callable[..., Any], query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               metadata: AttentionMetadata, return_lse: bool = False):
    """A packed batch through `attend(q, k, v)` on dense `[B, n, heads, dim]` views, one call per run of
    adjacent samples of the same query and key lengths (B of them: a pack of many small images is a
    few calls that fill the GPU, not one small call a sample); `attend` returns the output, or
    (output, log-sum-exp) with `return_lse`. The packed output (and log-sum-exp, float32 or wider)."""
    out = query.new_empty(query.shape[:-1] + value.shape[-1:])
    lse = query.new_empty(query.shape[:-1], dtype=torch.promote_types(query.dtype, torch.float32)) if return_lse else None
    q0 = k0 = 0
    for (nq, nk), run in itertools.groupby(zip(metadata.seq_lens_q, metadata.seq_lens_k)):
        count = len(list(run))
        q1, k1 = q0 + count * nq, k0 + count * nk
        if nq:
            result = attend(query[q0:q1].unflatten(0, (count, nq)), key[k0:k1].unflatten(0, (count, nk)),
                            value[k0:k1].unflatten(0, (count, nk)))
            if return_lse:
                out[q0:q1], lse[q0:q1] = result[0].flatten(0, 1), result[1].flatten(0, 1)
            else:
                out[q0:q1] = result.flatten(0, 1)
        q0, k0 = q1, k1
    return (out, lse) if return_lse else out
