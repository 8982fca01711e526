"""Where the compiled Wan DiT forward spends its GPU time: kernels grouped by kind.

Random Wan2.1-1.3B weights, 480x832x81, bf16, batch 1. Prints the top kernels and a summary
(matrix products, attention, fused elementwise, other), and times optional variants side by
side so that one call answers several questions.

    python bench/profile_wan.py --attention sdpa_cudnn
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


def kind(name: str) -> str:
    lowered = name.lower()
    if any(s in lowered for s in ("flash", "fmha", "cudnn", "attention", "sdpa")):
        return "attention"
    if any(s in lowered for s in ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul")):
        return "matmul"
    if "triton" in lowered:
        return "fused elementwise (triton)"
    return "other"


def time_forward(model, args, repeats: int = 5) -> float:
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
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    from ditserve.models.wan import WanTransformer3DModel

    device = torch.device("cuda")
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**COMMON, **WAN_CONFIGS["1.3b"], attention_backend=args.attention).to(torch.bfloat16).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    inputs = (
        torch.randn(1, 16, 21, 60, 104, device=device, dtype=torch.bfloat16, generator=gen),
        torch.tensor([999.0], device=device),
        torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16, generator=gen),
    )
    from ditserve.models import wan as wan_module

    fused_forward = wan_module.GELUProj.forward

    def unfused_forward(self, x):
        return torch.nn.functional.gelu(self.proj(x), approximate="tanh")

    with torch.inference_mode():
        x = torch.randn(4096, 1536, device=device, dtype=torch.bfloat16)
        w, b = model.blocks[0].ffn.net[0].proj.weight, model.blocks[0].ffn.net[0].proj.bias
        exact = torch.nn.functional.gelu(x.float() @ w.float().t() + b.float(), approximate="tanh")
        for label, fn in (("fused", fused_forward), ("unfused", unfused_forward)):
            err = ((fn(model.blocks[0].ffn.net[0], x).float() - exact).abs().max() / exact.abs().max()).item()
            print(f"linear+gelu {label}: max err vs float32 tanh-GELU {err:.2e}")
        wan_module.GELUProj.forward = unfused_forward
        eager_unfused_ms = time_forward(model, inputs)
        wan_module.GELUProj.forward = fused_forward
        eager_ms = time_forward(model, inputs)
        print(f"eager: unfused GELU {eager_unfused_ms:.1f} ms, fused {eager_ms:.1f} ms", flush=True)
        model.compile_blocks()
        compiled_ms = time_forward(model, inputs)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(*inputs)
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0]
    totals: dict[str, float] = defaultdict(float)
    rows = []
    for e in events:
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if us <= 0:
            continue
        totals[kind(e.key)] += us
        rows.append((us, e.count, e.key))
    rows.sort(reverse=True)
    print(f"eager {eager_ms:.1f} ms, compiled {compiled_ms:.1f} ms (attention={args.attention})")
    print(f"{'ms':>8} {'calls':>6}  kernel")
    for us, count, key in rows[: args.top]:
        print(f"{us / 1e3:8.2f} {count:6d}  {key[:150]}")
    print("by kind (ms):", {k: round(v / 1e3, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])})
    print("sum of kernel time (ms):", round(sum(totals.values()) / 1e3, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
