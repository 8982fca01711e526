"""Where the compiled Wan DiT forward spends its GPU time, and which candidate changes pay.

Random Wan2.1-1.3B weights, 480x832x81, bf16, batch 1. Times candidate variants side by side
(same weights, same inputs, one process), then profiles the last one: top kernels and a
summary by kind (matrix products, attention, fused elementwise, other).

Variants (comma-separated `--variants`):
  eager            the model as it ships, not compiled
  compiled         `compile_blocks()` as it ships
  torch-qk         compiled, q/k RMSNorm + rotary as plain torch ops (the fused Triton kernel off)
  qkv              compiled, self-attention q/k/v as one matrix product (`fuse_qkv_projections`)
  multi-kernel     compiled with inductor's `triton.multi_kernel` (persistent vs looped reductions, picked by timing)
  cd-tuning        compiled with inductor's `coordinate_descent_tuning`

    python bench/profile_wan.py --variants compiled,torch-qk,qkv,multi-kernel
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from wan import COMMON, WAN_CONFIGS  # noqa: E402

from ditserve.kernels import qk_norm_rotary  # noqa: E402
from ditserve.models import wan as wan_module  # noqa: E402

COMPILE_OPTIONS = {
    "multi-kernel": {"triton.multi_kernel": 1},
    "cd-tuning": {"coordinate_descent_tuning": True},
}


def kind(name: str) -> str:
    lowered = name.lower()
    if lowered.startswith("_quantize_rows"):  # FP8 linear layers' inputs, one pass a row (kernels/fp8_rows.py)
        return "fp8 quantization (linear inputs)"
    if lowered.startswith("_quantize"):  # the FP8 attention's block quantization (kernels/fp8_attention.py)
        return "fp8 quantization (attention inputs)"
    if any(s in lowered for s in ("flash", "fmha", "cudnn", "attention", "sdpa")):
        return "attention"
    if any(s in lowered for s in ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul")):
        return "matmul"
    if "triton" in lowered:
        return "fused elementwise (triton)"
    return "other"


def print_kernel_time(prof, top: int) -> dict[str, float]:
    """The `top` kernels by GPU time and the total by `kind` (ms), printed; the totals returned."""
    totals: dict[str, float] = defaultdict(float)
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if us <= 0:
            continue
        totals[kind(e.key)] += us / 1e3
        rows.append((us, e.count, e.key))
    rows.sort(reverse=True)
    print(f"{'ms':>8} {'calls':>6}  kernel")
    for us, count, key in rows[:top]:
        print(f"{us / 1e3:8.2f} {count:6d}  {key[:150]}")
    print("by kind (ms):", {k: round(v, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])})
    print("sum of kernel time (ms):", round(sum(totals.values()), 1))
    return dict(totals)


def time_forward(model, args, repeats: int) -> tuple[float, float, float]:
    for _ in range(3):
        model(*args)
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(*args)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples), min(samples), max(samples)


def torch_qk(q, k, weight_q, weight_k, cos, sin, eps, heads):
    """The fused kernel's math as plain torch ops (what torch.compile fused before the kernel)."""
    return qk_norm_rotary._torch_path(q, k, weight_q, weight_k, cos, sin, eps, heads)


def set_fused_qkv(model, fused: bool) -> None:
    """Self-attention q/k/v as one matrix product (what `WanPipeline` does) or as three."""
    if fused:
        model.fuse_qkv_projections()
    else:
        for block in model.blocks:
            block.attn1._qkv = None  # the three projections (views of the fused weight or not) compute alone


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--variants", default="eager,compiled,torch-qk,qkv,multi-kernel")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    device = torch.device("cuda")
    torch.manual_seed(0)
    with torch.device(device):
        model = wan_module.WanTransformer3DModel(**COMMON, **WAN_CONFIGS["1.3b"],
                                                 attention_backend=args.attention).to(torch.bfloat16).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    inputs = (
        torch.randn(1, 16, 21, 60, 104, device=device, dtype=torch.bfloat16, generator=gen),
        torch.tensor([999.0], device=device),
        torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16, generator=gen),
    )
    fused_qk = wan_module.qk_rms_norm_rotary
    results = {}
    reference = None
    with torch.inference_mode():
        for variant in args.variants.split(","):
            torch._dynamo.reset()
            wan_module.qk_rms_norm_rotary = torch_qk if variant == "torch-qk" else fused_qk
            set_fused_qkv(model, variant == "qkv")
            if variant != "eager":
                options = COMPILE_OPTIONS.get(variant)
                model.compile_blocks(**({"options": options} if options else {}))
            median, low, high = time_forward(model, inputs, args.repeats)
            out = model(*inputs)[0].float()
            reference = out if reference is None else reference
            err = ((out - reference).abs().max() / reference.abs().max()).item()
            results[variant] = median
            print(f"{variant:14s} {median:8.1f} ms [{low:.1f}-{high:.1f}]  max err vs first variant {err:.2e}", flush=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(*inputs)
            torch.cuda.synchronize()
    wan_module.qk_rms_norm_rotary = fused_qk

    print(f"profile of the last variant ({variant}):")
    print_kernel_time(prof, args.top)
    print("summary (ms):", {k: round(v, 1) for k, v in results.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
