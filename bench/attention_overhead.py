"""Host overhead of one `Attention` call vs calling torch SDPA directly (CPU, tiny tensors).

Both sides take the same `[batch, seq, heads, dim]` tensors, so the direct call includes the
layout transposes SDPA needs. Run: python bench/attention_overhead.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from ditserve.attention import Attention, AttentionMetadata


def _per_call_us(fn, calls: int = 20000, rounds: int = 7) -> float:
    for _ in range(1000):
        fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def main() -> None:
    torch.set_num_threads(1)
    q, k, v = (torch.randn(1, 16, 2, 8) for _ in range(3))
    layer = Attention("sdpa")
    metadata = AttentionMetadata()

    def direct():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    base = _per_call_us(direct)
    with_md = _per_call_us(lambda: layer(q, k, v, metadata))
    no_md = _per_call_us(lambda: layer(q, k, v))
    auto = Attention("auto")
    auto_md = _per_call_us(lambda: auto(q, k, v, metadata))
    print(f"torch SDPA direct:            {base:6.2f} us/call")
    print(f"Attention('sdpa'), metadata:  {with_md:6.2f} us/call  (+{with_md - base:.2f} us)")
    print(f"Attention('sdpa'), None:      {no_md:6.2f} us/call  (+{no_md - base:.2f} us)")
    print(f"Attention('auto'), metadata:  {auto_md:6.2f} us/call  (+{auto_md - base:.2f} us)")


if __name__ == "__main__":
    main()
