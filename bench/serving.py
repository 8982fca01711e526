"""Serving load test: continuous batching vs one request at a time, Poisson arrivals, mixed sizes.

Drives `ditserve.engine.batching.BatchingEngine` in-process (not over HTTP): a driver thread
submits requests at simulated Poisson arrival times (real wall-clock sleeps) to an engine
stepping on its own background thread, exactly as the server's runner will; latency is
arrival -> decoded frames (queueing included), so HTTP, JSON and file writing are left out.
The same engine runs both modes: batched (default limits: token budget from free GPU memory,
no size limit) and one at a time (`max_batch_size=1`, what `ditserve serve --max-batch-size 1`
does), on the same request sequence.

Model: the Wan2.1-T2V-1.3B transformer config with random weights in bf16, a small random
UMT5 encoder of width 4096 (2 layers: text encoding is not what this measures), the real
Wan2.1 VAE config (random weights, float32, decoding between steps as in serving), UniPC
flow scheduler; `--steps` denoising steps, CFG 5.0 (two samples per request per step), eager.

Phases (about 5 minutes on an H100 with the defaults):
1. warm-up: one request of each size batched, and each size alone (kernel JIT, selector trials);
2. alone: one 81-frame 480x832 request, the plain pipeline (`Pipeline.run`, what `generate`
   runs after validation) vs the engine, interleaved, `--alone-repeats` times each;
3. saturation: `--saturation-requests` small requests (single-frame 512x512 and 480x832,
   17-frame 480x832) all at t=0; throughput in requests per minute, per mode;
4. latency: `--latency-requests` requests of the full mix (small ones plus 81-frame ones) at
   Poisson rates = `--rate-fractions` x the one-at-a-time capacity on that mix (estimated from
   phases 2 and 3: per-size service time alone); p50/p95 latency per rate and mode.

    PYTHONPATH=src python bench/serving.py --markdown docs/performance.md --json docs/serving-h100.json
    PYTHONPATH=src python bench/serving.py --tiny      # CPU smoke test on the tiny test pipeline
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent / "tests"))  # tests/helpers: the tiny checkpoint builders
from report import publish, shown_args  # noqa: E402  (bench/report.py)
from wan import COMMON, WAN_CONFIGS  # noqa: E402  (bench/wan.py)

from ditserve.engine import GenerationRequest  # noqa: E402
from ditserve.engine.batching import BatchingEngine, StepStats  # noqa: E402
from ditserve.pipelines.wan import WanPipeline  # noqa: E402

# name -> (height, width, num_frames); the tiny pipeline gets small stand-ins of the same shapes
SIZES = {"512x512x1": (512, 512, 1), "480x832x1": (480, 832, 1), "480x832x17": (480, 832, 17),
         "480x832x81": (480, 832, 81)}
TINY_SIZES = {"512x512x1": (32, 32, 1), "480x832x1": (32, 48, 1), "480x832x17": (32, 48, 5),
              "480x832x81": (48, 64, 9)}
SMALL = ("512x512x1", "480x832x1", "480x832x17")
LARGE = "480x832x81"
SMALL_UMT5 = dict(d_model=4096, d_kv=64, num_heads=64, d_ff=1024, num_layers=2,
                  relative_attention_num_buckets=32, relative_attention_max_distance=128,
                  feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
PROMPTS = ["a red circle moving left on a blue background", "a cat running on the street at night",
           "a white bird flying over the sea", "a green tree in the city, close up view"]


# ----------------------------------------------------------------------------- the pipeline


def build_gpu_pipeline(device: torch.device) -> WanPipeline:
    """Wan2.1-1.3B DiT (random, bf16, diffusers' fp32 modules kept fp32), small UMT5, real VAE config."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    from ditserve.models.wan import WanTransformer3DModel
    from helpers.checkpoints import build_tiny_t5_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tiny_t5_tokenizer()
    with torch.device(device):
        dit = WanTransformer3DModel(**COMMON, **WAN_CONFIGS["1.3b"]).eval()
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **SMALL_UMT5)).to(torch.bfloat16).eval()
        vae = AutoencoderKLWan().eval()  # diffusers' default config is Wan2.1's
    keep = set(WanTransformer3DModel._keep_in_fp32_modules)
    for name, param in dit.named_parameters():
        if not any(part in keep for part in name.split(".")):
            param.data = param.data.to(torch.bfloat16)
    scheduler_config = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                            flow_shift=3.0)
    return WanPipeline(transformers=[dit], text_encoder=text_encoder, tokenizer=tokenizer, vae=vae,
                       new_scheduler=lambda: UniPCMultistepScheduler(**scheduler_config), device=device,
                       dtype=torch.bfloat16)


def build_tiny_pipeline() -> WanPipeline:
    from helpers.checkpoints import build_tiny_wan_pipeline

    folder = build_tiny_wan_pipeline(Path(tempfile.mkdtemp(prefix="ditserve-serving-")) / "pipeline", seed=0)
    return WanPipeline.from_pretrained(folder, device="cpu", dtype="fp32")


# ----------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Arrival:
    at_s: float  # seconds after the run starts
    size: str
    request: GenerationRequest


def make_requests(pipe: WanPipeline, sizes: dict[str, tuple[int, int, int]], names: list[str], steps: int,
                  seed: int) -> list[GenerationRequest]:
    rng = random.Random(seed)
    out = []
    for i, name in enumerate(names):
        h, w, f = sizes[name]
        out.append(pipe.validate(prompt=rng.choice(PROMPTS), negative_prompt="blurry, low quality", height=h,
                                 width=w, num_frames=f, num_inference_steps=steps, guidance_scale=5.0,
                                 seed=seed * 1000 + i))
    return out


def poisson_arrivals(requests: list[GenerationRequest], names: list[str], rate_per_s: float | None,
                     seed: int) -> list[Arrival]:
    """Exponential gaps at `rate_per_s` (None: all at t=0, i.e. saturation)."""
    rng = random.Random(seed)
    at, out = 0.0, []
    for name, request in zip(names, requests):
        out.append(Arrival(at, name, request))
        if rate_per_s is not None:
            at += rng.expovariate(rate_per_s)
    return out


def run_load(pipe: WanPipeline, arrivals: list[Arrival], max_batch_size: int | None) -> dict[str, Any]:
    """Submit at the arrival times to a background engine; wait for all; latencies and step stats."""
    steps: list[StepStats] = []
    engine = BatchingEngine(pipe, max_batch_size=max_batch_size, on_step=steps.append)
    done_at: dict[int, float] = {}
    futures: list[Future] = []
    engine.start()
    start = time.perf_counter()
    for i, arrival in enumerate(arrivals):
        delay = start + arrival.at_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        future = engine.submit(arrival.request)
        future.add_done_callback(lambda f, i=i: done_at.setdefault(i, time.perf_counter()))
        futures.append(future)
    outputs = [f.result() for f in futures]
    end = time.perf_counter()
    engine.stop()
    latencies = [done_at[i] - (start + a.at_s) for i, a in enumerate(arrivals)]
    by_size: dict[str, list[float]] = {}
    for arrival, latency in zip(arrivals, latencies):
        by_size.setdefault(arrival.size, []).append(latency)
    return {
        "max_batch_size": max_batch_size,
        "max_batch_tokens": engine.max_batch_tokens,
        "requests": len(arrivals),
        "wall_s": end - start,
        "requests_per_min": 60 * len(arrivals) / (end - start),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "latency_max_s": max(latencies),
        "latency_p50_by_size_s": {k: percentile(v, 50) for k, v in sorted(by_size.items())},
        "service_s_by_size": {k: statistics.mean(o.timings["total_s"] for o, a in zip(outputs, arrivals)
                                                 if a.size == k) for k in sorted(by_size)},
        "stage_s_by_size": {k: {stage: statistics.mean(o.timings[stage] for o, a in zip(outputs, arrivals)
                                                       if a.size == k)
                                for stage in ("queue_s", "text_encode_s", "denoise_s", "decode_wait_s", "decode_s")}
                            for k in sorted(by_size)},
        "steps": len(steps),
        "mean_requests_per_step": statistics.mean(s.requests for s in steps),
        "max_requests_per_step": max(s.requests for s in steps),
        "mean_tokens_per_step": statistics.mean(s.tokens for s in steps),
        "max_tokens_per_step": max(s.tokens for s in steps),
    }


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# ----------------------------------------------------------------------------- phases


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(pipe: WanPipeline, sizes: dict[str, tuple[int, int, int]]) -> float:
    start = time.perf_counter()
    names = list(sizes)
    batch = make_requests(pipe, sizes, names, steps=2, seed=99)
    pipe.generate_batch(batch)
    for request in make_requests(pipe, sizes, names, steps=1, seed=98):
        pipe.generate_batch([request])
    sync(pipe.device)
    return time.perf_counter() - start


def alone_81(pipe: WanPipeline, sizes: dict[str, tuple[int, int, int]], steps: int, repeats: int) -> dict[str, Any]:
    """One 81-frame request: plain `Pipeline.run` vs the engine, interleaved; the fastest of each."""
    (request,) = make_requests(pipe, sizes, [LARGE], steps, seed=7)
    runs: dict[str, list[dict[str, float]]] = {"plain": [], "engine": []}
    for mode in ("plain", "engine") * repeats:
        sync(pipe.device)
        start = time.perf_counter()
        if mode == "plain":
            out = pipe.run(request)
        else:
            engine = BatchingEngine(pipe)
            future = engine.submit(request)
            engine.run_until_idle()
            out = future.result()
        sync(pipe.device)
        wall = time.perf_counter() - start
        run = {"wall_s": wall, "total_s": out.timings["total_s"], "step_mean_s": out.timings["step_mean_s"],
               "decode_s": out.timings["decode_s"]}
        runs[mode].append(run)
        print(f"  alone {mode}: {json.dumps(run)}", flush=True)
    rows: dict[str, Any] = {mode: min(r, key=lambda x: x["wall_s"]) for mode, r in runs.items()}
    rows["runs"] = runs
    rows["engine_over_plain"] = rows["engine"]["wall_s"] / rows["plain"]["wall_s"]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny random test pipeline on the CPU (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per request (default 6; tiny 3)")
    parser.add_argument("--saturation-requests", type=int, default=None, help="small requests at t=0 (default 24)")
    parser.add_argument("--latency-requests", type=int, default=None, help="requests per latency run (default 20)")
    parser.add_argument("--alone-repeats", type=int, default=2, help="runs of the 81-frame request per mode")
    parser.add_argument("--large-per-run", type=int, default=1, help="81-frame requests in each latency run")
    parser.add_argument("--rate-fractions", default="0.5,1.0,2.0",
                        help="Poisson rates as fractions of the one-at-a-time capacity on the latency mix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", help="append a results section to this file")
    parser.add_argument("--json", help="write all results here")
    args = parser.parse_args()
    steps = args.steps or (3 if args.tiny else 6)
    n_sat = args.saturation_requests or (6 if args.tiny else 24)
    n_lat = args.latency_requests or (6 if args.tiny else 20)
    fractions = [float(x) for x in args.rate_fractions.split(",")]
    if not 0 <= args.large_per_run <= n_lat:
        parser.error("--large-per-run must be between 0 and --latency-requests")

    t0 = time.perf_counter()
    if args.tiny:
        pipe, sizes, device_name = build_tiny_pipeline(), TINY_SIZES, "CPU (tiny test pipeline)"
    else:
        if not torch.cuda.is_available():
            print("bench/serving.py needs a CUDA GPU (or --tiny for a CPU smoke test)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        pipe, sizes, device_name = build_gpu_pipeline(device), SIZES, torch.cuda.get_device_name()
    print(f"built the pipeline in {time.perf_counter() - t0:.1f} s; budget "
          f"{BatchingEngine(pipe).max_batch_tokens} tokens per step", flush=True)
    tokens = {name: pipe.tokens_per_sample(make_requests(pipe, sizes, [name], 1, 0)[0]) for name in sizes}
    print(f"tokens per sample: {tokens}", flush=True)

    print(f"warm-up: {warm_up(pipe, sizes):.1f} s", flush=True)

    print("phase: one 81-frame request alone", flush=True)
    alone = alone_81(pipe, sizes, steps, args.alone_repeats)

    print("phase: saturation, small-request mix, all at t=0", flush=True)
    names = [SMALL[i % len(SMALL)] for i in range(n_sat)]
    random.Random(args.seed).shuffle(names)
    requests = make_requests(pipe, sizes, names, steps, seed=args.seed + 1)
    arrivals = poisson_arrivals(requests, names, None, args.seed)
    saturation = {}
    for mode, limit in (("one_at_a_time", 1), ("batched", None)):
        saturation[mode] = run_load(pipe, arrivals, limit)
        print(f"  {mode}: {json.dumps(saturation[mode])}", flush=True)
    saturation["speedup"] = saturation["batched"]["requests_per_min"] / saturation["one_at_a_time"]["requests_per_min"]

    # one-at-a-time capacity on the latency mix, from the per-size service times measured alone
    service = dict(saturation["one_at_a_time"]["service_s_by_size"])
    service[LARGE] = alone["engine"]["total_s"]
    names = [LARGE] * args.large_per_run + [SMALL[i % len(SMALL)] for i in range(n_lat - args.large_per_run)]
    random.Random(args.seed + 2).shuffle(names)
    work_s = sum(service[name] for name in names)
    capacity = len(names) / work_s  # requests per second, one at a time
    print(f"phase: latency; one-at-a-time capacity on this mix ~{60 * capacity:.1f} req/min "
          f"({work_s:.1f} s of work for {len(names)} requests)", flush=True)
    latency = []
    for k, fraction in enumerate(fractions):
        requests = make_requests(pipe, sizes, names, steps, seed=args.seed + 10 + k)
        arrivals = poisson_arrivals(requests, names, fraction * capacity, args.seed + 10 + k)
        row: dict[str, Any] = {"fraction": fraction, "rate_per_min": 60 * fraction * capacity}
        for mode, limit in (("one_at_a_time", 1), ("batched", None)):
            row[mode] = run_load(pipe, arrivals, limit)
            print(f"  rate x{fraction} {mode}: p50 {row[mode]['latency_p50_s']:.2f} s, p95 "
                  f"{row[mode]['latency_p95_s']:.2f} s, {row[mode]['wall_s']:.1f} s", flush=True)
        latency.append(row)
    total_s = time.perf_counter() - t0
    print(f"total {total_s:.0f} s", flush=True)

    model = ("the tiny random test pipeline (tests/helpers/checkpoints.py), float32" if args.tiny else
             "Wan2.1-T2V-1.3B DiT config (random weights, bf16), small random UMT5 (width 4096), Wan2.1 VAE "
             "(random weights, float32)")
    config = {"model": model,
              "steps": steps, "guidance_scale": 5.0, "sizes": {k: list(v) for k, v in sizes.items()},
              "tokens_per_sample": tokens, "saturation_requests": n_sat, "latency_requests": n_lat,
              "large_per_run": args.large_per_run, "rate_fractions": fractions, "seed": args.seed,
              "max_batch_tokens": saturation["batched"]["max_batch_tokens"]}
    results = {"date": str(datetime.date.today()), "device": device_name, "torch": torch.__version__,
               "command": command(), "config": config, "alone_81": alone, "saturation": saturation,
               "latency": latency, "total_s": total_s}
    publish(markdown(results), results, args.markdown, args.json)
    return 0


def command() -> str:
    """This run's command line without output paths."""
    return f"python bench/serving.py {shown_args()}".rstrip()


def markdown(r: dict[str, Any]) -> str:
    c, sat, alone = r["config"], r["saturation"], r["alone_81"]
    one, bat = sat["one_at_a_time"], sat["batched"]
    lines = [
        f"### Serving: continuous batching vs one at a time — {r['date']}, {r['device']}, torch {r['torch']}",
        "",
        f"Command: `{r['command']}` ({r['total_s']:.0f} s). {c['model']}, UniPC, {c['steps']} steps, "
        f"CFG {c['guidance_scale']}, eager. In-process engine (`BatchingEngine` on a background thread, requests "
        "submitted at Poisson arrival times; latency = arrival -> decoded frames). Batched: token budget "
        f"{c['max_batch_tokens']} per step (the engine's default: from free GPU memory), no size limit; one at a "
        "time: `max_batch_size=1`. Tokens per sample: "
        + ", ".join(f"{k} {v}" for k, v in c["tokens_per_sample"].items()) + " (a CFG request is two samples).",
        "",
        f"Saturation, small-request mix ({c['saturation_requests']} requests of 512x512x1, 480x832x1, 480x832x17, "
        "all at t=0):",
        "",
        "| mode | requests/min | wall (s) | mean / max requests per step | mean tokens per step |",
        "|---|---|---|---|---|",
    ]
    for name, row in (("one at a time", one), ("batched", bat)):
        lines.append(f"| {name} | {row['requests_per_min']:.1f} | {row['wall_s']:.1f} | "
                     f"{row['mean_requests_per_step']:.1f} / {row['max_requests_per_step']} | "
                     f"{row['mean_tokens_per_step']:.0f} |")
    stages = one["stage_s_by_size"]
    lines += [
        "",
        f"Batched / one at a time: **{sat['speedup']:.2f}x** throughput. Where one request's time goes, one at a "
        "time (mean s: text / denoise / decode): "
        + ", ".join(f"{k} {v['text_encode_s']:.2f} / {v['denoise_s']:.2f} / {v['decode_s']:.2f}"
                    for k, v in stages.items()) + ".",
        "",
        f"Latency, full mix ({c['latency_requests']} requests per rate, {c['large_per_run']} of them 480x832x81, "
        "the rest as above), Poisson arrivals at fractions of the one-at-a-time capacity on this mix:",
        "",
        "| rate (req/min) | x capacity | one at a time p50 / p95 / max (s) | batched p50 / p95 / max (s) "
        "| batched mean requests per step |",
        "|---|---|---|---|---|",
    ]
    for row in r["latency"]:
        o, b = row["one_at_a_time"], row["batched"]
        lines.append(f"| {row['rate_per_min']:.1f} | {row['fraction']:.2f} | {o['latency_p50_s']:.2f} / "
                     f"{o['latency_p95_s']:.2f} / {o['latency_max_s']:.2f} | {b['latency_p50_s']:.2f} / "
                     f"{b['latency_p95_s']:.2f} / {b['latency_max_s']:.2f} | {b['mean_requests_per_step']:.1f} |")
    p, e = alone["plain"], alone["engine"]
    lines += [
        "",
        f"One 480x832x81 request alone (fastest of {len(alone['runs']['plain'])} per mode, interleaved): plain "
        f"pipeline {p['wall_s']:.2f} s (step {p['step_mean_s']:.3f} s, decode {p['decode_s']:.2f} s), engine {e['wall_s']:.2f} s (step {e['step_mean_s']:.3f} s, decode "
        f"{e['decode_s']:.2f} s): engine / plain = **{alone['engine_over_plain']:.3f}**.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
