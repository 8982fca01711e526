"""Packed ragged batches: torch's `varlen_attn` on CUDA, a per-sample SDPA loop elsewhere.

Both return the log-sum-exp on request (`varlen_attn`'s `return_aux`; the reference maths per
sample elsewhere), so ring attention over packed batches runs on it."""

from __future__ import annotations

import inspect
from functools import cached_property

import torch
import torch.nn.functional as F

from ditserve.attention.backends.base import AttentionBackend, Capabilities
from ditserve.attention.backends.per_sample import per_sample
from ditserve.attention.backends.reference import ReferenceBackend
from ditserve.attention.metadata import AttentionMetadata


class VarlenBackend(AttentionBackend):
    """One kernel launch for all samples on CUDA; correct (not fast) per-segment fallback on CPU."""

    name = "varlen"
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16}),
        head_dims=(1, 256),
        dense=False,
        packed=True,
        returns_lse=True,
    )

    @cached_property
    def _varlen_attn(self):
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            return None
        return varlen_attn

    @cached_property
    def _params(self) -> frozenset[str]:
        return frozenset(inspect.signature(self._varlen_attn).parameters) if self._varlen_attn else frozenset()

    def why_not(self, call, device):
        reason = super().why_not(call, device)
        if reason or call.device_type != "cuda":
            return reason
        if self._varlen_attn is None:
            return "this torch has no torch.nn.attention.varlen.varlen_attn"
        if call.dtype not in (torch.float16, torch.bfloat16):
            return f"torch's varlen_attn on CUDA takes float16/bfloat16, not {call.dtype}"
        if call.head_dim % 8 or call.head_dim_v % 8:
            return f"torch's varlen_attn on CUDA needs head_dim a multiple of 8, not {call.head_dim}"
        if call.causal and not ({"window_size", "is_causal"} & self._params):
            return "this torch's varlen_attn cannot do causal attention"
        return None

    def forward(self, query, key, value, metadata: AttentionMetadata, scale: float, return_lse: bool = False):
        if query.is_cuda:
            return self._cuda(query, key, value, metadata, scale, return_lse)
        if return_lse:  # ring attention on the CPU: exact, per sample
            return ReferenceBackend().forward(query, key, value, metadata, scale, return_lse=True)
        return self._per_segment(query, key, value, metadata, scale)

    def _cuda(self, query, key, value, metadata, scale, return_lse: bool = False):
        kwargs: dict = {"scale": scale}
        if return_lse:
            from torch.nn.attention.varlen import AuxRequest

            kwargs["return_aux"] = AuxRequest(lse=True)
        group = query.shape[1] // key.shape[1]
        if group > 1:
            if "enable_gqa" in self._params:
                kwargs["enable_gqa"] = True
            else:  # torch 2.11's varlen_attn has no GQA: share each KV head explicitly
                key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        if metadata.causal:
            if "window_size" in self._params:
                kwargs["window_size"] = (-1, 0)
            else:
                kwargs["is_causal"] = True
        out = self._varlen_attn(
            query, key, value, metadata.cu_seqlens_q, metadata.cu_seqlens_k, metadata.max_seq_len_q, metadata.max_seq_len_k, **kwargs
        )
        if not return_lse:
            return out
        out, lse = out
        if tuple(lse.shape) == (query.shape[1], query.shape[0]):  # the kernel's [heads, tokens] (what the op declares;
            lse = lse.transpose(0, 1)  # the docstring says [tokens, heads]): as heads, also when tokens == heads
        return out, lse.float()

    @staticmethod
    def _per_segment(query, key, value, metadata, scale):
        def attend(q, k, v):  # samples of one length, [B, n, heads, dim]
            group = q.shape[2] // k.shape[2]
            q = q.transpose(1, 2)
            k, v = (x.transpose(1, 2).repeat_interleave(group, dim=1) for x in (k, v))
            nq, nk = q.shape[2], k.shape[2]
            mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(diagonal=nk - nq) if metadata.causal else None
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).nan_to_num(0.0).transpose(1, 2)

        return per_sample(attend, query, key, value, metadata)
