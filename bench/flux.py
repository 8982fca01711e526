"""Flux.1-dev DiT forward on one GPU: ditserve vs diffusers' FluxTransformer2DModel, same weights.

Random weights from the published FLUX.1-dev transformer config (bf16), one 1024x1024 image
(4,096 image tokens + 512 T5 tokens), guidance embedding on. Per variant: median of --repeats
after warm-up, peak memory, MFU against the bf16 matrix rate measured in this run, and the
attention backends `auto` chose. A variant is `LIB:BACKEND[:compile]`.

    python bench/flux.py --markdown docs/performance.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from report import publish, shown_args  # noqa: E402  (bench/report.py)
from wan import matmul_rate, time_ms  # noqa: E402  (bench/wan.py)

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
TEXT_LEN = 512


def forward_flops(side: int, text_len: int = TEXT_LEN) -> float:
    """Linear layers and attention matmuls of one forward (multiply-add = 2 FLOPs)."""
    d = FLUX_DEV["num_attention_heads"] * FLUX_DEV["attention_head_dim"]
    tokens = (side // 16) ** 2 + text_len
    double = 2 * tokens * d * d * 4 + 2 * tokens * d * 4 * d * 2 + 4 * tokens * tokens * d  # qkv+o, MLP, attention
    single = 2 * tokens * d * 7 * d + 2 * tokens * 5 * d * d + 4 * tokens * tokens * d  # qkv+MLP in, out, attention
    return FLUX_DEV["num_layers"] * double + FLUX_DEV["num_single_layers"] * single


def build_models(device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, diffusers') FLUX.1-dev transformers in bf16 on `device`, with the same random weights."""
    from diffusers import FluxTransformer2DModel as Theirs

    from ditserve.loading import instantiate_on_meta
    from ditserve.models.flux import FluxTransformer2DModel as Ours

    torch.manual_seed(0)
    with torch.device(device):
        theirs = Theirs(**FLUX_DEV).to(torch.bfloat16).eval()
    ours = instantiate_on_meta(lambda: Ours.from_config(dict(FLUX_DEV)))
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    return ours.to(device, torch.bfloat16).eval(), theirs


def forward_inputs(side: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One forward's arguments (diffusers' names) for a `side` x `side` grid of packed latent tokens."""
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
        guidance=torch.tensor([3.5], device=device, dtype=torch.float32),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--variants", default="ditserve:auto,diffusers:native,diffusers:_native_cudnn,"
                                              "ditserve:auto:compile,diffusers:native:compile")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode for both libraries' compiled rows (e.g. max-autotune-no-cudagraphs: "
                             "inductor's own GEMM templates, tuned, with the elementwise work fused in)")
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/flux.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    rate = matmul_rate(device)
    flops = forward_flops(args.side)
    ours, theirs = build_models(device)
    side = args.side // 16
    inputs = forward_inputs(side, device)
    print(f"{flops / 1e12:.1f} TFLOP per forward; bf16 matmul {rate / 1e12:.0f} TFLOP/s", flush=True)

    variants = [(v.split(":") + [""])[:3] for v in args.variants.split(",")]
    variants.sort(key=lambda v: v[2] == "compile")  # compiling is in place: eager rows first
    rows, outputs, compiled = [], {}, set()
    for lib, backend, mode in variants:
        model = ours if lib == "ditserve" else theirs
        try:
            model.set_attention_backend(backend)
            if mode and lib not in compiled:
                mode_kwargs = {"mode": args.compile_mode} if args.compile_mode else {}
                if lib == "ditserve":
                    model.compile_blocks(**mode_kwargs)
                else:
                    model.compile_repeated_blocks(fullgraph=True, **mode_kwargs)
                compiled.add(lib)
        except Exception as err:  # noqa: BLE001 - a peer's backend missing here is a result
            print(f"skip {lib}:{backend}: {err}", flush=True)
            continue

        def run(model=model):
            return model(**inputs, return_dict=False)[0]

        with torch.inference_mode():
            torch.cuda.reset_peak_memory_stats()
            ms = time_ms(run, args.repeats, warmup=3 if mode else 2)
            outputs[(lib, backend, mode)] = run().float()
        label = (f", compiled {args.compile_mode}" if args.compile_mode else ", compiled") if mode else ""
        row = {"variant": f"{lib} ({backend}{label})", "forward_ms": ms,
               "mfu": flops / (ms * 1e-3) / rate, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        if lib == "ditserve":
            row["attention_choices"] = sorted(set(model.attention_selector.choices.values()))
        rows.append(row)
        print(json.dumps(row), flush=True)
        gc.collect()
    ref = outputs.get(("diffusers", "native", ""))
    base = next((r for r in rows if r["variant"] == "diffusers (native)"), None)
    lines = [
        f"#### FLUX.1-dev DiT forward, {args.side}x{args.side} ({side * side} image + {TEXT_LEN} text tokens), bf16 — "
        f"{datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}",
        "",
        f"Command: `python bench/flux.py {shown_args()}`. Random weights from the published config; "
        f"{flops / 1e12:.0f} TFLOP per forward; bf16 matmul rate measured in this run: {rate / 1e12:.0f} TFLOP/s.",
        "",
        "| variant | forward (ms) | vs diffusers default | MFU | peak GiB | max rel err vs diffusers |",
        "|---|---|---|---|---|---|",
    ]
    for (key, out), r in zip(outputs.items(), rows):
        err = f"{((out - ref).abs().max() / ref.abs().max()).item():.2e}" if ref is not None else "–"
        speed = f"{base['forward_ms'] / r['forward_ms']:.2f}x" if base else "–"
        choice = " → " + "/".join(r["attention_choices"]) if "attention_choices" in r else ""
        lines.append(f"| {r['variant']}{choice} | {r['forward_ms']:.1f} | {speed} | {r['mfu']:.0%} | "
                     f"{r['peak_gib']:.1f} | {err} |")
    publish("\n".join(lines) + "\n", rows, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
