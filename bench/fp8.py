"""FP8 linear layers vs bf16: the Wan DiT forward on one GPU, same weights, same inputs.

Random weights from the published config (bench/wan.py's `build_models`, q/k/v fused as the
pipeline does), bf16. Variants `bf16` and `fp8` (`quantize_fp8`: every linear layer of the
blocks in e4m3, weights per output row, activations per token), each eager or `:compile`
(`compile_blocks`, as shipped); a variant ending `+launch` runs the FP8 attention kernel
(`--fp8-attention triton_fp8`) with `--fp8-launch`'s options instead of its defaults, to try a
launch at full size before it becomes the default. Per variant:
forward median over --repeats after warm-up, peak memory, MFU against the bf16 matrix rate
measured in this run, and the output's error against the eager bf16 forward (max |diff| / max
|ref|, and PSNR over the output's range).

    python bench/fp8.py --config 14b --variants bf16:compile,fp8:compile --markdown docs/performance.md
    python bench/fp8.py --config 14b --fp8-attention triton_fp8 --variants bf16:compile,fp8:compile,fp8:compile+launch \
        --fp8-launch max_registers=160,block_m=128
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import math
import sys

import torch
from report import publish, shown_args  # bench/report.py
from wan import COMMON, NAMES, SIZES, TEXT_LEN, WAN_CONFIGS, build_models, forward_flops, matmul_rate, time_ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(WAN_CONFIGS), default="14b")
    parser.add_argument("--variants", default="bf16:compile,fp8:compile",
                        help="comma-separated bf16|fp8[:compile][+launch]")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--attention-backend", default="auto", help="both models' attention (e.g. fa4 where installed)")
    parser.add_argument("--fp8-attention", default=None,
                        help="the FP8 model's attention instead (e.g. triton_fp8: FP8 attention too)")
    parser.add_argument("--fp8-launch", default="",
                        help="FP8 attention kernel launch options for `+launch` variants, e.g. max_registers=160,block_m=128")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, profile one forward of each variant: kernel time by kind (matrix products, "
                             "attention, quantization, fused elementwise) and the idle time between kernels")
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()
    kinds = {_kind(v) for v in args.variants.split(",")}  # checks every variant before any work
    if not torch.cuda.is_available():
        print("bench/fp8.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    cfg = {**COMMON, **WAN_CONFIGS[args.config]}
    height, width, frames = SIZES[args.config]
    lat_shape = (cfg["in_channels"], (frames - 1) // 4 + 1, height // 8, width // 8)
    tokens = lat_shape[1] * (lat_shape[2] // 2) * (lat_shape[3] // 2)
    flops = forward_flops(cfg, tokens)
    rate = matmul_rate(device)
    print(f"config {args.config}: {tokens} tokens, {flops / 1e12:.1f} TFLOP; bf16 matmul {rate / 1e12:.0f} TFLOP/s", flush=True)

    bf16, _ = build_models(cfg, device, need_diffusers=False)
    bf16.set_attention_backend(args.attention_backend)
    gen = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(1, *lat_shape, device=device, dtype=torch.bfloat16, generator=gen)
    text = torch.randn(1, TEXT_LEN, 4096, device=device, dtype=torch.bfloat16, generator=gen)
    timestep = torch.tensor([999.0], device=device)
    with torch.inference_mode():
        reference = bf16(latents, timestep, text, return_dict=False)[0].float()
    models = {"bf16": bf16}
    if "fp8" in kinds:
        model, _ = build_models(cfg, device, need_diffusers=False)  # seeded: the same weights
        assert torch.equal(model.proj_out.weight, bf16.proj_out.weight)
        model.set_attention_backend(args.fp8_attention or args.attention_backend)
        print(f"quantized {model.quantize_fp8()} linear layers", flush=True)
        models["fp8"] = model

    from ditserve.kernels import fp8_attention as fp8_kernel

    launch = _launch_options(args.fp8_launch)
    default_kernel = fp8_kernel.fp8_attention
    rows, compiled = [], set()
    variants = sorted(args.variants.split(","), key=lambda v: ":" in v.partition("+")[0])  # compiling is in place
    for variant in variants:
        name, _, extra = variant.partition("+")
        mode = name.partition(":")[2]
        # the attention backend looks the kernel up at each call, and attention runs outside the compiled graphs
        fp8_kernel.fp8_attention = functools.partial(default_kernel, **launch) if extra == "launch" else default_kernel
        model = models[_kind(variant)]
        if mode and id(model) not in compiled:
            model.compile_blocks()
            compiled.add(id(model))
        torch.cuda.reset_peak_memory_stats()

        def run(model=model):
            return model(latents, timestep, text, return_dict=False)[0]

        with torch.inference_mode():
            ms = time_ms(run, args.repeats, warmup=args.warmup + (1 if mode else 0))
            out = run().float()
        err = ((out - reference).abs().max() / reference.abs().max()).item()
        mse = ((out - reference) ** 2).mean().item()
        span = (reference.max() - reference.min()).item()
        row = {"variant": variant + (f" ({args.fp8_launch})" if extra == "launch" else ""), "forward_ms": ms,
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
               "mfu_of_bf16_rate": flops / (ms * 1e-3) / rate, "max_err_vs_bf16_eager": err,
               "psnr_vs_bf16_eager_db": math.inf if mse == 0 else 10 * math.log10(span**2 / mse),
               "attention": sorted(set(model.attention_selector.choices.values()))}
        if args.profile:
            row["kernel_ms_by_kind"] = _profile(run, variant)
            row["idle_between_kernels_ms"] = ms - sum(row["kernel_ms_by_kind"].values())
        rows.append(row)
        print(json.dumps(row), flush=True)
        gc.collect()

    base = next((r for r in rows if r["variant"] == "bf16:compile"), rows[0])
    lines = [
        f"#### FP8 vs bf16: {NAMES[args.config]} DiT forward, {height}x{width}x{frames} ({tokens} tokens) — "
        f"{datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}",
        "",
        f"Command: `python bench/fp8.py {shown_args()}`. Random weights from the published config, batch 1; "
        f"{flops / 1e12:.0f} TFLOP per forward; bf16 matmul rate measured in this run: {rate / 1e12:.0f} TFLOP/s. "
        f"Errors against the eager bf16 forward's output.",
        "",
        f"| variant | forward (ms) | vs {base['variant']} | MFU (of the bf16 rate) | peak GiB | max err | PSNR (dB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} → {'/'.join(r['attention']) or args.attention_backend} | {r['forward_ms']:.0f} | {base['forward_ms'] / r['forward_ms']:.2f}x | "
                     f"{r['mfu_of_bf16_rate']:.0%} | {r['peak_gib']:.1f} | {r['max_err_vs_bf16_eager']:.2e} | "
                     f"{r['psnr_vs_bf16_eager_db']:.1f} |")
    if args.profile:
        kinds = sorted({k for r in rows for k in r["kernel_ms_by_kind"]})
        lines += ["", "GPU time of one forward by kernel kind (ms, `torch.profiler`), and the time between kernels:", "",
                  "| variant | " + " | ".join(kinds) + " | idle between kernels |", "|---|" + "---|" * (len(kinds) + 1)]
        for r in rows:
            cells = [f"{r['kernel_ms_by_kind'].get(k, 0.0):.0f}" for k in kinds]
            lines.append(f"| {r['variant']} | " + " | ".join(cells) + f" | {r['idle_between_kernels_ms']:.0f} |")
    publish("\n".join(lines) + "\n", rows, args.markdown, args.json)
    return 0


def _kind(variant: str) -> str:
    """The kind (model instance) of a variant `kind[:mode][+extra]`; a bad kind, mode or extra stops the
    bench here, before any model is built."""
    name, _, extra = variant.partition("+")
    kind, _, mode = name.partition(":")
    if kind not in ("bf16", "fp8"):
        raise SystemExit(f"variant {variant!r}: the kind is bf16 or fp8")
    if mode not in ("", "compile"):
        raise SystemExit(f"variant {variant!r}: the only mode after ':' is compile")
    if extra not in ("", "launch"):
        raise SystemExit(f"variant {variant!r}: the only part after '+' is launch")
    return kind


def _profile(run, variant: str) -> dict[str, float]:
    """One forward under the profiler: its kernels' GPU time by kind (ms), printed with the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    from profile_wan import print_kernel_time  # bench/profile_wan.py

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    print(f"profile of {variant}:", flush=True)
    return print_kernel_time(prof, top=15)


def _launch_options(text: str) -> dict:
    """'max_registers=None,block_m=128' -> {'max_registers': None, 'block_m': 128} (ints, True/False/None, else strings),
    checked by the kernel's own `LaunchOptions`."""
    from ditserve.kernels.fp8_attention import LaunchOptions

    options: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--fp8-launch takes name=value pairs, got {item!r}")
        literal = {"True": True, "False": False, "None": None}
        options[key] = literal[value] if value in literal else int(value) if value.lstrip("-").isdigit() else value
    try:
        LaunchOptions(**options)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"--fp8-launch: {err}") from None
    return options


if __name__ == "__main__":
    sys.exit(main())
