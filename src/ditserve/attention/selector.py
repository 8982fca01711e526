"""Choosing a backend per call: pinned by name, or `auto` = the fastest measured for this shape.

No kernel wins everywhere (the fastest depends on the GPU, the sequence lengths, packing and
head_dim: docs/performance.md), so `auto` times every backend that can serve
a shape bucket on the call's own inputs the first time the bucket is seen, and remembers the
winner in this selector. Where timing is impossible (CPU, CUDA-graph capture, torch.compile
tracing) it takes the first capable backend in `FALLBACK_ORDER`.
"""

from __future__ import annotations

import os
import statistics
import threading
from collections.abc import Callable

import torch

from ditserve.attention.backends import BACKEND_FACTORIES, AttentionBackend, AttentionBackendError, AttentionCall, create_backends

__all__ = ["ENV_VAR", "FALLBACK_ORDER", "AttentionSelector", "resolve_backend_name"]

ENV_VAR = "DITSERVE_ATTENTION_BACKEND"
# Used only where nothing can be measured; fast kernels first, exact-but-slow ones last.
FALLBACK_ORDER = ("fa4", "flash_attn", "sdpa", "varlen", "sdpa_cudnn_per_sample", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "reference")
# Never timed against the fast kernels: they materialise the full score matrix (49 GB at 32k tokens).
_NOT_TRIALLED = frozenset({"reference", "sdpa_math"})


def resolve_backend_name(name: str | None) -> str:
    """The backend name to use: the argument, else $DITSERVE_ATTENTION_BACKEND, else 'auto'."""
    resolved = name or os.environ.get(ENV_VAR) or "auto"
    if resolved != "auto" and resolved not in BACKEND_FACTORIES:
        source = "argument" if name else f"${ENV_VAR}"
        raise ValueError(f"unknown attention backend {resolved!r} (from {source}); choose 'auto' or one of {sorted(BACKEND_FACTORIES)}")
    return resolved


def check_pinned_backend(name: str, device: torch.device, dtype: torch.dtype) -> None:
    """A pinned backend that cannot run on `device` in `dtype` (wrong device kind, missing package, GPU
    generation, dtype) is a ValueError naming the backends that can, before a model loads; the
    shape-dependent reasons (head_dim, masks...) can only show at the first call."""
    if name == "auto":
        return
    backends = create_backends()
    reason = backends[name].why_not_on(device, dtype)
    if reason is not None:
        able = sorted(other for other, backend in backends.items() if backend.why_not_on(device, dtype) is None)
        raise ValueError(f"attention backend {name!r} cannot run on {device} in {str(dtype).removeprefix('torch.')}: "
                         f"{reason}; choose 'auto' or one of {able}")


def _seq_bucket(n: int) -> int:
    """Round up to a power of two: calls in one bucket share one measured choice."""
    return 1 << max(0, (n - 1).bit_length())


def selection_bucket(call: AttentionCall, device: torch.device) -> tuple:
    return (
        device.type,
        device.index,
        call.dtype,
        call.head_dim,
        call.head_dim_v,
        call.num_heads_q,
        call.num_heads_kv,
        call.packed,
        call.causal,
        call.has_mask,
        _seq_bucket(call.max_seq_len_q),
        _seq_bucket(call.max_seq_len_k),
        _seq_bucket(call.batch_size),
    )


def _can_measure(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return False
    return True


def _time_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: JIT compilation, workspace allocation, handle creation
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class AttentionSelector:
    """Maps each attention call to a backend. One per model, shared by all its layers.

    Its only state is configuration (the requested name) and the memo of measured choices.
    """

    def __init__(self, backend: str | None = None, *, trial_repeats: int = 3) -> None:
        self.name = resolve_backend_name(backend)
        self.trial_repeats = trial_repeats
        self._backends = create_backends()
        self._choices: dict[tuple, AttentionBackend] = {}
        self._by_call: dict[AttentionCall, AttentionBackend] = {}  # exact-call memo over _choices
        self._lock = threading.Lock()

    @property
    def choices(self) -> dict[tuple, str]:
        """What `auto` chose so far, bucket -> backend name (for logs and benchmarks)."""
        return {bucket: backend.name for bucket, backend in self._choices.items()}

    def capable(self, call: AttentionCall, device: torch.device) -> dict[str, str | None]:
        """Every registered backend -> None if it can serve `call`, else the reason it cannot."""
        return {name: backend.why_not(call, device) for name, backend in self._backends.items()}

    def backend_for(self, call: AttentionCall, device: torch.device, inputs: tuple) -> AttentionBackend:
        """The backend for this call; `inputs` = (q, k, v, metadata, scale), used to time `auto` trials."""
        key = (call, device)
        backend = self._by_call.get(key)
        if backend is not None:
            return backend
        bucket = selection_bucket(call, device)
        backend = self._choices.get(bucket)
        if backend is not None:
            if len(self._by_call) > 4096:  # packed batches of many sizes: keep the memo small
                self._by_call.clear()
            self._by_call[key] = backend
            return backend
        with self._lock:
            backend = self._choices.get(bucket)
            if backend is None:
                backend = self._pinned(call, device) if self.name != "auto" else self.fastest(call, device, inputs)
                if self.name != "auto" or _can_measure(device) or device.type != "cuda":
                    self._choices[bucket] = backend  # a capture-time fallback is not remembered
        return backend

    def _pinned(self, call: AttentionCall, device: torch.device) -> AttentionBackend:
        backend = self._backends[self.name]
        reason = backend.why_not(call, device)
        if reason is not None:
            able = [name for name, why in self.capable(call, device).items() if why is None]
            raise AttentionBackendError(
                f"attention backend {self.name!r} cannot serve this call ({_describe(call)}): {reason}. "
                f"Backends that can: {able or 'none'}"
            )
        return backend

    def fastest(self, call: AttentionCall, device: torch.device, inputs: tuple, *, needs_lse: bool = False) -> AttentionBackend:
        """The backend that times fastest on `inputs` (the first able one where timing is not possible).

        `needs_lse`: only backends that return the log-sum-exp, timed returning it (ring attention).
        Not memoised: `backend_for` and the parallel wrappers keep their own memo.
        """
        reasons = self.capable(call, device)
        able = [name for name in FALLBACK_ORDER  # (it lists no lossy backend, such as FP8: never chosen for speed)
                if reasons[name] is None and (not needs_lse or self._backends[name].capabilities.returns_lse)]
        if not able:
            detail = "; ".join(f"{name}: {why}" for name, why in reasons.items())
            raise AttentionBackendError(f"no attention backend can serve this call ({_describe(call)}): {detail}")
        trialled = [name for name in able if name not in _NOT_TRIALLED]
        if len(trialled) < 2 or not _can_measure(device):
            return self._backends[(trialled or able)[0]]
        query, key, value, metadata, scale = inputs
        timings: dict[str, float] = {}
        for name in trialled:
            backend = self._backends[name]
            try:
                extra = {"return_lse": True} if needs_lse else {}
                timings[name] = _time_ms(lambda: backend.forward(query, key, value, metadata, scale, **extra), self.trial_repeats)
            except (AttentionBackendError, RuntimeError, AssertionError, ValueError):
                continue  # a kernel that refuses this shape at run time simply drops out
        if not timings:
            return self._backends[able[0]]
        return self._backends[min(timings, key=timings.__getitem__)]


def _describe(call: AttentionCall) -> str:
    layout = f"packed batch of {call.batch_size}" if call.packed else f"dense batch {call.batch_size}"
    extras = [x for x, on in (("causal", call.causal), ("mask", call.has_mask), ("GQA", call.gqa)) if on]
    return (
        f"{call.device_type} {str(call.dtype).removeprefix('torch.')}, {layout}, q heads {call.num_heads_q}, "
        f"kv heads {call.num_heads_kv}, head_dim {call.head_dim}, seq q {call.max_seq_len_q} k {call.max_seq_len_k}"
        + (f", {'/'.join(extras)}" if extras else "")
    )
