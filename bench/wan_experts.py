"""Wan2.2-T2V-A14B on one GPU: both experts resident vs only the expert in use (the other in host memory).

Two random 14B experts (the published A14B transformer config, bf16), a small UMT5 and the
Wan2.1 VAE; one CFG generation per variant at the same seed. Reported: step median, total time,
expert switches and the time they took, peak GPU memory, and PSNR of the offloaded run against
the first resident run, and of a second resident run (the same weights run, only their place
changes; the second resident run shows how far two identical runs of random 14B weights drift).

    python bench/wan_experts.py --markdown docs/performance.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
sys.path.insert(1, __file__.rsplit("/", 2)[0] + "/tests")  # tests/helpers: the tiny tokenizer
from report import psnr, publish, shown_args  # noqa: E402  (bench/report.py)
from wan import COMMON, WAN_CONFIGS  # noqa: E402  (bench/wan.py)

SMALL_UMT5 = dict(d_model=4096, d_kv=64, num_heads=64, d_ff=1024, num_layers=2, relative_attention_num_buckets=32,
                  relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0)


def build(device: torch.device, offload: bool, experts: list) -> object:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    from ditserve.pipelines.wan import WanPipeline
    from helpers.checkpoints import build_tiny_t5_tokenizer

    tokenizer = build_tiny_t5_tokenizer()
    with torch.device(device):
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **SMALL_UMT5)).to(torch.bfloat16).eval()
        vae = AutoencoderKLWan().eval()
    config = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=12.0)
    return WanPipeline(transformers=experts, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae,
                       new_scheduler=lambda: UniPCMultistepScheduler(**config), device=device, dtype=torch.bfloat16,
                       boundary_ratio=0.875, offload_experts=offload)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--num-frames", type=int, default=21)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/wan_experts.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from ditserve.models.wan import WanTransformer3DModel

    device = torch.device("cuda")
    torch.manual_seed(0)
    with torch.device(device):
        experts = [WanTransformer3DModel(**{**COMMON, **WAN_CONFIGS["a14b"]}).to(torch.bfloat16).eval() for _ in range(2)]
    request = dict(prompt="a cat surfing a wave", negative_prompt="blurry", height=args.height, width=args.width,
                   num_frames=args.num_frames, num_inference_steps=args.steps, guidance_scale=4.0, guidance_scale_2=3.0,
                   seed=0)
    rows, frames = [], {}
    for variant in ("resident", "resident again", "offloaded"):
        pipe = build(device, variant == "offloaded", experts)
        pipe.generate(**{**request, "num_inference_steps": 2})  # warm-up: kernels, FA4 compilation, one switch
        residency = pipe.residency
        real_use, switch_s = residency.use, []

        def timed_use(index: int, real_use=real_use, switch_s=switch_s, residency=residency) -> object:
            before = residency.swaps
            torch.cuda.synchronize()
            start = time.perf_counter()
            model = real_use(index)
            torch.cuda.synchronize()
            if residency.swaps != before:
                switch_s.append(time.perf_counter() - start)
            return model

        residency.use = timed_use
        torch.cuda.reset_peak_memory_stats()
        out = pipe.generate(**request)
        frames[variant] = out.frames
        row = {"variant": variant, "step_median_s": statistics.median(out.timings["per_step_s"]),
               "total_s": out.timings["total_s"], "switches": len(switch_s), "switch_s": switch_s,
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del residency.use

    lines = [
        f"#### Wan2.2-T2V-A14B, experts resident vs offloaded, {args.height}x{args.width}x{args.num_frames}, "
        f"{args.steps} steps, CFG 4.0 / 3.0, bf16 — {datetime.date.today()}, {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}",
        "",
        f"Command: `python bench/wan_experts.py {shown_args()}`. Two random 14B experts (published config), "
        "a small UMT5, the Wan2.1 VAE; after a 2-step warm-up. Peak: `max_memory_allocated` during the run.",
        "",
        "| variant | step median (s) | total (s) | expert switches | switch time (s) | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        switch = ", ".join(f"{s:.2f}" for s in r["switch_s"]) or "–"
        lines.append(f"| {r['variant']} | {r['step_median_s']:.3f} | {r['total_s']:.1f} | {r['switches']} | {switch} | "
                     f"{r['peak_gib']:.1f} |")
    lines += ["", f"PSNR against the first resident run: resident again {psnr(frames['resident again'], frames['resident']):.1f} dB, "
                  f"offloaded {psnr(frames['offloaded'], frames['resident']):.1f} dB."]
    publish("\n".join(lines) + "\n", rows, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
