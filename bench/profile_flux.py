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

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from flux import FLUX_DEV, TEXT_LEN  # noqa: E402  (bench/flux.py)
from profile_wan import kind, time_forward  # noqa: E402  (bench/profile_wan.py)


def inputs(side: int, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.zeros(side, side, 3, device=device)
    ids[..., 1] += torch.arange(side, device=device)[:, None]
    ids[..., 2] += torch.arange(side, device=device)[None, :]
    return dict(
        hidden_states=torch.randn(1, side * side, 64, device=device, dtype=torch.bfloat16, generator=gen),
        encoder_hidden_states=torch.randn(1, TEXT_LEN, 4096, device=device, dtype=torch.bfloat16, generator=gen),
        pooled_projections=torch.randn(1, 768, device=device, dtype=torch.bfloat16, generator=gen),
        timestep=torch.tensor([0.5], device=device, dtype=torch.bfloat16),
        img_ids=ids.reshape(-1, 3).to(torch.bfloat16),
        txt_ids=torch.zeros(TEXT_LEN, 3, device=device, dtype=torch.bfloat16),
        guidance=torch.tensor([3.5], device=device), return_dict=False,
    )


def breakdown(name: str, model, kwargs: dict, repeats: int, top: int) -> None:
    median, low, high = time_forward(lambda: model(**kwargs), (), repeats)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(**kwargs)
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
    from diffusers import FluxTransformer2DModel as Theirs

    from ditserve.loading import instantiate_on_meta
    from ditserve.models.flux import FluxTransformer2DModel as Ours

    device = torch.device("cuda")
    torch.manual_seed(0)
    with torch.device(device):
        theirs = Theirs(**FLUX_DEV).to(torch.bfloat16).eval()
    ours = instantiate_on_meta(lambda: Ours.from_config(dict(FLUX_DEV)))
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    ours = ours.to(device, torch.bfloat16).eval()
    ours.set_attention_backend(args.ours)
    theirs.set_attention_backend(args.theirs)
    ours.compile_blocks()
    theirs.compile_repeated_blocks(fullgraph=True)
    kwargs = inputs(args.side // 16, device)
    with torch.inference_mode():
        breakdown(f"ditserve ({args.ours}, compiled)", ours, kwargs, args.repeats, args.top)
        print("attention choices:", sorted(set(ours.attention_selector.choices.values())))
        breakdown(f"diffusers ({args.theirs}, compiled)", theirs, kwargs, args.repeats, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
