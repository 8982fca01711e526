"""Where the compiled FLUX.1-dev forward spends its GPU time: ditserve vs diffusers, by kernel kind.

Random FLUX.1-dev weights (published config), 1024x1024, bf16, batch 1, both models compiled
(ours `compile_blocks()`, diffusers' `compile_repeated_blocks(fullgraph=True)`), each with the
attention backend given. Prints, per model, the GPU time by kind (matrix products, attention,
fused elementwise, other) and the top kernels, so a gap between the two shows where it is.

    python bench/profile_flux.py --ours auto --theirs native
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from flux import build_models, forward_inputs  # noqa: E402  (bench/flux.py)
from profile_wan import kind, time_forward  # noqa: E402  (bench/profile_wan.py)


def breakdown(name: str, run: Callable[[], object], repeats: int, top: int) -> None:
    """Time `run` (one forward), then profile one call: GPU time by kind and the top kernels."""
    median, low, high = time_forward(run, (), repeats)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if us > 0:
            totals[kind(e.key)] += us
            rows.append((us, e.count, e.key))
    rows.sort(reverse=True)
    print(f"\n== {name}: {median:.1f} ms [{low:.1f}-{high:.1f}]", flush=True)
    print("by kind (ms):", {k: round(v / 1e3, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])})
    print("sum of kernel time (ms):", round(sum(totals.values()) / 1e3, 1))
    for us, count, key in rows[:top]:
        print(f"{us / 1e3:8.2f} {count:6d}  {key[:140]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours", default="auto", help="ditserve attention backend")
    parser.add_argument("--theirs", default="native", help="diffusers attention backend")
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda")
    ours, theirs = build_models(device)
    ours.set_attention_backend(args.ours)
    theirs.set_attention_backend(args.theirs)
    ours.compile_blocks()
    theirs.compile_repeated_blocks(fullgraph=True)
    kwargs = dict(forward_inputs(args.side // 16, device), return_dict=False)
    with torch.inference_mode():
        breakdown(f"ditserve ({args.ours}, compiled)", lambda: ours(**kwargs), args.repeats, args.top)
        print("attention choices:", sorted(set(ours.attention_selector.choices.values())))
        breakdown(f"diffusers ({args.theirs}, compiled)", lambda: theirs(**kwargs), args.repeats, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
