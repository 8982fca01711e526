"""Where the compiled FLUX.1-dev forward spends its GPU time: ditserve vs diffusers, by kernel kind.

Random FLUX.1-dev weights (published config), 1024x1024, bf16, batch 1, both models compiled
(ours `compile_blocks()`, diffusers' `compile_repeated_blocks(fullgraph=True)`), each with the
attention backend given. Prints, per model, the GPU time by kind (matrix products, attention,
fused elementwise, other) and the top kernels, so a gap between the two shows where it is.

`--packed 1024,768,512,256`: ours only, a serving batch instead. The packed forward of those sizes
(`forward_packed`, as the batching engine runs it) against each size alone, kind by kind, so that
what packing costs beyond the sum of its samples (the gathers that interleave text and image
tokens, per-token modulation, the packed attention kernel) shows where it is.

`--burst FOLDER`: the HTTP burst's workload (bench/serving_http.py: `--requests` images of `--sizes` in
turn, `--steps` steps, all at once) through the batching engine in-process, with the server's pipeline
(`--compile`) and warm-up, batched and one at a time. Each timed burst is profiled on the GPU as a
whole: how long the GPU was busy (the union of every stream's kernels, the VAE's included), how long it
sat idle inside the burst and in which gaps, and kernel time by kind; so a burst slower than its
kernels shows whether the time went to idle GPU (the host behind) or to slower kernels.

    python bench/profile_flux.py --ours auto --theirs native
    python bench/profile_flux.py --packed 1024,768,512,256
    python bench/profile_flux.py --burst /tmp/flux-dev --sizes 256x256,512x512,768x768,1024x1024 --steps 28 --requests 32
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


def burst_timeline(events: list, wall_s: float) -> dict[str, float]:
    """GPU busy and idle over a profiled burst from its kernel events (all streams)."""
    spans = sorted((e.start_ns(), e.end_ns()) for e in events)
    busy, idle_long, idle_short, gaps_long = 0, 0, 0, 0
    cur_start, cur_end = spans[0]
    for start, end in spans[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            gap = start - cur_end
            if gap > 1_000_000:  # > 1 ms: the GPU waited on the host (step boundaries, a host-bound stretch)
                idle_long += gap
                gaps_long += 1
            else:
                idle_short += gap
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    first, last = spans[0][0], max(end for _, end in spans)
    return {"wall_s": wall_s, "gpu_span_s": (last - first) / 1e9, "gpu_busy_s": busy / 1e9,
            "idle_gaps_over_1ms_s": idle_long / 1e9, "gaps_over_1ms": gaps_long, "idle_gaps_under_1ms_s": idle_short / 1e9}


def burst(folder: str, sizes: list[tuple[int, int]], steps: int, requests: int, modes: list[str], device: str,
          compile: bool) -> None:
    """`requests` images of `sizes` in turn through the batching engine, per mode, each burst profiled
    (on a CPU, `device="cpu"`, a smoke run of the same code: host events stand in for kernels)."""
    from ditserve import Pipeline
    from ditserve.engine.batching import BatchingEngine
    from ditserve.server.main import warm_up

    pipe = Pipeline.from_pretrained(folder, device=device, compile=compile)
    on_gpu = pipe.device.type == "cuda"
    print(f"server warm-up: {warm_up(pipe):.1f} s", flush=True)

    def run(engine: BatchingEngine, n_steps: int) -> float:
        start = time.perf_counter()
        futures = [engine.submit(pipe.validate(f"a red circle moving left on a blue background {i}", height=h, width=w,
                                               num_inference_steps=n_steps, seed=i))
                   for i, (h, w) in ((i, sizes[i % len(sizes)]) for i in range(requests))]
        for future in futures:
            future.result()
        return time.perf_counter() - start

    for mode in modes:
        engine = BatchingEngine(pipe, max_batch_size=None if mode == "batched" else 1)
        engine.start()
        for _ in range(2 if compile else 1):  # as serving_http.py: the packed shapes' compiles before the timed burst
            print(f"\n== {mode}: warm-up burst at 2 steps {run(engine, 2):.1f} s", flush=True)
        steps_before = engine.stats().steps
        with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
            wall = run(engine, steps)
            if on_gpu:
                torch.cuda.synchronize()
        forwards = engine.stats().steps - steps_before
        engine.stop()
        events = [e for e in prof.profiler.kineto_results.events()
                  if (e.device_type() == torch.autograd.DeviceType.CUDA) == on_gpu and e.duration_ns() > 0]
        if not events:  # a CPU smoke run: the host profiler sees no thread that began before it (the engine's)
            print(f"{mode}: {wall:.1f} s, {forwards} forwards; no kernel events to analyse")
            continue
        timeline = burst_timeline(events, wall)
        by_kind: dict[str, float] = defaultdict(float)
        by_stream: dict[int, float] = defaultdict(float)
        for e in events:
            by_kind[kind(e.name())] += e.duration_ns() / 1e9
            by_stream[e.device_resource_id()] += e.duration_ns() / 1e9
        print(f"{mode}: {wall:.1f} s, {forwards} forwards; " + ", ".join(f"{k} {v:.2f}" for k, v in timeline.items()))
        print("kernel time by kind (s):", {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])})
        print("kernel time by stream (s):", {k: round(v, 2) for k, v in sorted(by_stream.items(), key=lambda kv: -kv[1])})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours", default="auto", help="ditserve attention backend")
    parser.add_argument("--theirs", default="native", help="diffusers attention backend")
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--packed", help="comma-separated sides (px) of one packed batch, e.g. 1024,768,512,256")
    parser.add_argument("--burst", metavar="FOLDER", help="a FLUX folder (bench/build_flux_folder.py): profile the HTTP burst's workload")
    parser.add_argument("--sizes", default="256x256,512x512,768x768,1024x1024", help="--burst: HEIGHTxWIDTH, in turn")
    parser.add_argument("--steps", type=int, default=28, help="--burst: steps per image")
    parser.add_argument("--requests", type=int, default=32, help="--burst: images in the burst")
    parser.add_argument("--modes", default="batched,one", help="--burst: batched and/or one (one at a time)")
    parser.add_argument("--device", default="cuda", help="--burst: cpu for a smoke run")
    parser.add_argument("--eager", action="store_true", help="--burst: the pipeline uncompiled (the server without --compile)")
    args = parser.parse_args()
    if args.burst:
        modes = args.modes.split(",")
        if not modes or any(mode not in ("batched", "one") for mode in modes):
            parser.error(f"--modes takes batched and/or one, got {args.modes!r}")
        try:
            sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
        except ValueError:
            parser.error(f"--sizes takes HEIGHTxWIDTH,..., got {args.sizes!r}")
        burst(args.burst, sizes, args.steps, args.requests, modes, args.device, not args.eager)
        return 0
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
