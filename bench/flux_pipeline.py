"""Whole FLUX.1-dev generation on one GPU: ditserve vs diffusers' FluxPipeline, same folder.

Both load the same diffusers-format folder (bench/build_flux_folder.py: the published FLUX.1-dev
transformer and VAE configs with random weights, a small T5), one pipeline at a time, so each
variant's peak memory is its own. Per variant: a 1-step warm-up (cuBLAS/cuDNN autotuning, and
for `ditserve:compile` the compilation), then one timed generation at the model's defaults
(1024x1024, 28 steps, guidance 3.5): time per step, total, peak GPU memory, PSNR vs diffusers.

    python bench/build_flux_folder.py /tmp/flux-dev
    python bench/flux_pipeline.py /tmp/flux-dev --markdown docs/performance.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from report import psnr, publish, shown_args  # noqa: E402  (bench/report.py)

PROMPT = "a red fox in the snow at dawn, photograph"


def run_diffusers(folder: str, request: dict) -> tuple[np.ndarray, float, list[float]]:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    marks: list[float] = []

    def on_step(_pipe, _i, _t, kwargs):
        torch.cuda.synchronize()
        marks.append(time.perf_counter())
        return kwargs

    def call(steps: int, callback=None) -> np.ndarray:
        return pipe(PROMPT, height=request["height"], width=request["width"], num_inference_steps=steps,
                    guidance_scale=request["guidance_scale"], generator=torch.Generator("cpu").manual_seed(0),
                    output_type="np", callback_on_step_end=callback).images[0]

    call(1)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    image = call(request["num_inference_steps"], on_step)
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    return image, total, list(np.diff(marks))  # step 0 (with text encoding) left out


def run_ditserve(folder: str, request: dict, compile: bool) -> tuple[np.ndarray, float, list[float]]:
    from ditserve import Pipeline

    pipe = Pipeline.from_pretrained(folder, device="cuda", compile=compile)
    t0 = time.perf_counter()
    pipe.generate(PROMPT, **{**request, "num_inference_steps": 2 if compile else 1}, seed=0)  # warm-up
    print(f"warm-up{' + compile' if compile else ''}: {time.perf_counter() - t0:.1f} s", flush=True)
    torch.cuda.reset_peak_memory_stats()
    result = pipe.generate(PROMPT, **request, seed=0)
    del pipe
    return result.frames[0], result.timings["total_s"], list(result.timings["per_step_s"])[1:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--variants", default="diffusers,ditserve,ditserve:compile")
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/flux_pipeline.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import diffusers

    request = dict(height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=args.guidance)
    rows, images = [], {}
    for variant in args.variants.split(","):
        gc.collect()
        torch.cuda.empty_cache()
        if variant == "diffusers":
            image, total, steps = run_diffusers(args.folder, request)
        else:
            image, total, steps = run_ditserve(args.folder, request, compile=variant.endswith(":compile"))
        images[variant] = image
        row = {"variant": variant, "total_s": total, "step_median_s": statistics.median(steps),
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["variant"] == "diffusers"), None)
    lines = [
        f"#### FLUX.1-dev whole generation, {args.size}x{args.size}, {args.steps} steps, guidance {args.guidance}, bf16 — "
        f"{datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}, diffusers {diffusers.__version__}",
        "",
        f"Command: `python bench/flux_pipeline.py {shown_args()}` on a folder from `bench/build_flux_folder.py` "
        "(published transformer and VAE configs, random weights, a 2-layer T5 of the real width). One pipeline "
        "loaded at a time; each after a warm-up generation. Peak: `max_memory_allocated` during the timed run.",
        "",
        "| variant | step median (ms) | total (s) | speed-up vs diffusers | peak GiB | PSNR vs diffusers (dB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = f"{base['total_s'] / r['total_s']:.2f}x" if base else "–"
        similar = f"{psnr(images[r['variant']], images['diffusers']):.1f}" if base else "–"
        lines.append(f"| {r['variant']} | {r['step_median_s'] * 1e3:.1f} | {r['total_s']:.2f} | {speed} | "
                     f"{r['peak_gib']:.1f} | {similar} |")
    publish("\n".join(lines) + "\n", rows, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
