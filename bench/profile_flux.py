"""Where the compiled FLUX.1-dev forward spends its GPU time: ditserve vs diffusers, by kernel kind.

Random FLUX.1-dev weights (published config), 1024x1024, bf16, batch 1, both models compiled
(ours `compile_blocks()`, diffusers' `compile_repeated_blocks(fullgraph=True)`), each with the
attention backend given. Prints, per model, the GPU time by kind (matrix products, attention,
fused elementwise, other) and the top kernels, so a gap between the two shows where it is.

`--packed 1024,768,512,256`: ours only, a serving batch instead. The packed forward of those sizes
(`forward_packed`, as the batching engine runs it) against each size alone, kind by kind, so that
what packing costs beyond the sum of its samples (the gathers that interleave text and image
tokens, per-token modulation, the packed attention kernel) shows where it is.

    python bench/profile_flux.py --ours auto --theirs native
    python bench/profile_flux.py --packed 1024,768,512,256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from compile_shapes import flux_sample, our_flux_dev  # noqa: E402  (bench/compile_shapes.py)
from flux import build_models, forward_inputs  # noqa: E402  (bench/flux.py)
from profile_wan import kind, time_forward  # noqa: E402  (bench/profile_wan.py)


def breakdown(name: str, run: Callable[[], object], repeats: int, top: int, gaps: bool = True) -> dict[str, float]:
    """Time `run` (one forward), then profile one call: GPU time by kind and the top kernels; returns
    the median wall (`wall`) and each kind's GPU time, in ms. `gaps`: also `host_side`."""
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
    if gaps:
        host_side(run)
    return {"wall": median, **{k: v / 1e3 for k, v in totals.items()}}


_SYNCING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpyAsync")


def host_side(run: Callable[[], object], repeats: int = 5) -> None:
    """Why the GPU waits: the host's time to enqueue one forward against its wall time (enqueue
    close to wall = the host holds the GPU back, or a sync inside), then one profile with host
    activity: the calls that can block the host, and the GPU's idle gaps by the kernel that ends them."""
    enqueue, wall = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        queued = time.perf_counter()
        torch.cuda.synchronize()
        enqueue.append((queued - start) * 1e3)
        wall.append((time.perf_counter() - start) * 1e3)
    print(f"host: enqueue {statistics.median(enqueue):.1f} ms of wall {statistics.median(wall):.1f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    for e in prof.key_averages():
        if e.key in _SYNCING:
            print(f"  {e.key}: {e.count} calls, {e.cpu_time_total / 1e3:.2f} ms host")
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    idle: dict[str, list[float]] = defaultdict(list)
    for (_, end, _), (start, _, name) in zip(kernels, kernels[1:]):
        if start - end > 10:  # us; back-to-back kernels are ~2-5 us apart
            idle[name[:90]].append(start - end)
    total = sum(sum(v) for v in idle.values())
    print(f"  GPU idle > 10 us between kernels: {total / 1e3:.1f} ms in {sum(map(len, idle.values()))} gaps; by the kernel after:")
    for name, waits in sorted(idle.items(), key=lambda kv: -sum(kv[1]))[:8]:
        print(f"  {sum(waits) / 1e3:7.2f} ms {len(waits):5d} gaps  {name}")


def packed_against_alone(sides: list[int], backend: str, repeats: int, top: int) -> None:
    """Our compiled packed forward of `sides` against the sum of each side alone, kind by kind."""
    device = torch.device("cuda")
    model = our_flux_dev(device)
    model.set_attention_backend(backend)
    model.compile_blocks()
    samples = [flux_sample(side, device) for side in sides]
    with torch.inference_mode():
        packed = breakdown(f"packed {'+'.join(map(str, sides))}", lambda: model.forward_packed(samples), repeats, top)
        print("attention choices:", sorted(set(model.attention_selector.choices.values())))
        alone = [breakdown(f"{side} alone", lambda s=s: model.forward_packed([s]), repeats, 0)
                 for side, s in zip(sides, samples)]
    print("\n| kind | packed (ms) | sum alone (ms) | packed - sum |\n|---|---|---|---|")
    for name in sorted(set(packed) | {k for a in alone for k in a}, key=lambda k: (k != "wall", -packed.get(k, 0))):
        total = sum(a.get(name, 0.0) for a in alone)
        print(f"| {name} | {packed.get(name, 0.0):.1f} | {total:.1f} | {packed.get(name, 0.0) - total:+.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours", default="auto", help="ditserve attention backend")
    parser.add_argument("--theirs", default="native", help="diffusers attention backend")
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--packed", help="comma-separated sides (px) of one packed batch, e.g. 1024,768,512,256")
    args = parser.parse_args()
    if args.packed:
        sides = [int(side) for side in args.packed.split(",")]
        if any(side <= 0 or side % 16 for side in sides):
            parser.error(f"--packed takes sides in pixels, multiples of 16, got {args.packed!r}")
        packed_against_alone(sides, args.ours, args.repeats, args.top)
        return 0
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
