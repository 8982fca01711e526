"""FP8 attention (`kernels.fp8_attention`): pinned by name (`--attention-backend triton_fp8`), never `auto`.

It trades accuracy for speed, so it is a lever the user opts into with its quality measured
(docs/performance.md), not a kernel `auto` may pick because it times faster. A packed batch runs
one kernel call per sample; no mask, not causal, head_dim 32, 64 or 128 (the same for q, k and v).
"""

from __future__ import annotations

import torch

from ditserve.attention.backends.base import AttentionBackend, Capabilities
from ditserve.attention.backends.per_sample import PerSampleBackend
from ditserve.attention.metadata import AttentionMetadata
from ditserve.kernels import fp8_attention as kernel


class TritonFp8Backend(AttentionBackend):
    name = "triton_fp8"
    capabilities = Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        head_dims=(32, 128),
        head_dim_multiple=32,
        packed=True,
        causal=False,
        lossy=True,
    )

    def __init__(self) -> None:
        self._per_sample = PerSampleBackend(self)

    def unavailable_reason(self) -> str | None:
        return None if kernel.triton_available() else "Triton is not installed (it ships with CUDA builds of torch)"

    def device_reason(self, device: torch.device) -> str | None:
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return f"FP8 attention needs FP8 tensor cores (compute capability 8.9 or newer), this GPU is sm{major}{minor}"
        return None

    def why_not(self, call, device):
        reason = super().why_not(call, device)
        if reason is None and call.head_dim_v != call.head_dim:
            return f"takes the same head_dim for q, k and v, not {call.head_dim} and {call.head_dim_v}"
        if reason is None and call.head_dim not in kernel.HEAD_DIMS:
            return f"takes head_dim {', '.join(map(str, kernel.HEAD_DIMS))}, not {call.head_dim}"
        return reason

    def forward(self, query, key, value, metadata: AttentionMetadata, scale: float):
        if metadata.packed:
            return self._per_sample.forward(query, key, value, metadata, scale)
        return kernel.fp8_attention(query, key, value, scale)
