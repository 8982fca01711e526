"""Whole Cosmos3 generation on one GPU: does a request cost its forwards, its text and its decode, and nothing more?

Issue 15's check of hidden overhead: in one process, from one diffusers-format folder (e.g. from
bench/build_cosmos3_folder.py: the Nano-sized transformer and the Wan2.2 VAE, random weights),
time one bare vision-tower forward at the request's shape (the prompt's kept K/V, as a step runs
it), then the whole `generate` (default request: 1280x720x189, 35 steps, guidance 6, so two
forwards per step), and compare the total with forward x forwards + text encoding + VAE decode.

    python bench/build_cosmos3_folder.py /tmp/cosmos3-nano
    python bench/cosmos3_pipeline.py /tmp/cosmos3-nano [--compile] [--steps 35]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from report import publish, shown_args  # noqa: E402  (bench/report.py)

PROMPT = "A red fox runs through fresh snow at dawn, the camera tracking it low to the ground."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a Cosmos3 diffusers-format folder")
    parser.add_argument("--steps", type=int, default=None, help="default: the checkpoint's (35)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num-frames", type=int, default=None)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="timed bare forwards")
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()

    from ditserve import Pipeline
    from ditserve.models.cosmos3 import Cosmos3Sample

    start = time.perf_counter()
    pipe = Pipeline.from_pretrained(args.model, compile=args.compile)
    load_s = time.perf_counter() - start
    params = {k: v for k, v in dict(height=args.height, width=args.width, num_frames=args.num_frames,
                                    num_inference_steps=args.steps).items() if v is not None}
    request = pipe.validate(PROMPT, **params)
    device, sync = pipe.device, (torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None))

    with torch.inference_mode():
        prepared = pipe.prepare_batch([request])[0]
        condition, per_step = prepared.conditions[0], len(prepared.conditions)  # two with guidance
        sample = Cosmos3Sample(latents=prepared.latents[0].to(pipe.dtype), timestep=prepared.timesteps[0],
                               text=condition.text, positions=condition.positions)
        times = []
        for i in range(args.repeats + (3 if args.compile else 1)):
            sync()
            t0 = time.perf_counter()
            pipe.transformer.forward_packed([sample])
            sync()
            times.append(time.perf_counter() - t0)
        forward_s = statistics.median(times[-args.repeats:])
        del prepared, condition, sample
    forwards = request.num_inference_steps * per_step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = pipe.run(request)
    t = result.timings
    expected = forward_s * forwards + t["text_encode_s"] + t["decode_s"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    row = {"request": f"{request.width}x{request.height}x{request.num_frames}", "steps": request.num_inference_steps,
           "guidance_scale": request.guidance_scale, "compile": args.compile, "load_s": load_s,
           "forward_s": forward_s, "forwards": forwards, "text_encode_s": t["text_encode_s"],
           "denoise_s": t["denoise_s"], "step_median_s": statistics.median(t["per_step_s"]), "decode_s": t["decode_s"],
           "total_s": t["total_s"], "expected_s": expected, "overhead": t["total_s"] / expected - 1, "peak_gib": peak}
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [
        f"#### Cosmos3 whole generation, {row['request']}, {row['steps']} steps, guidance {request.guidance_scale:g}, "
        f"{str(pipe.dtype).removeprefix('torch.')}{', compiled' if args.compile else ''} — {datetime.date.today()}, "
        f"{device_name}, torch {torch.__version__}",
        "",
        f"Command: `python bench/cosmos3_pipeline.py {shown_args()}`. One process: a bare vision-tower forward at the "
        "request's shape (median of the timed repeats), then the whole generation; expected = forward x forwards + "
        "text encoding + decode.",
        "",
        "| forward (s) | forwards | text (s) | denoise (s) | step median (s) | decode (s) | total (s) | expected (s) | "
        "overhead | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {forward_s:.3f} | {forwards} | {row['text_encode_s']:.2f} | {row['denoise_s']:.1f} | {row['step_median_s']:.3f} | "
        f"{row['decode_s']:.1f} | {row['total_s']:.1f} | {expected:.1f} | {row['overhead']:+.1%} | {peak:.1f} |",
    ]
    publish("\n".join(lines) + "\n", row, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
