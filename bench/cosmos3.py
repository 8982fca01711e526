"""Cosmos3 forward on one GPU: ditserve vs diffusers' Cosmos3OmniTransformer, same weights.

Random bf16 weights from diffusers' default `Cosmos3OmniTransformer` config (Nano-sized: 36
layers, hidden 4096, 32 query / 8 K/V heads of 128), a prompt of --text-len tokens and one
1280x720x189 video (48 latent frames of 23x40 patches: 44,160 vision tokens; 720 is padded to
the patch). Variants (`lib:backend[:compile]`):
  ditserve       what a ditserve denoising step runs: the vision tower over [kept text K/V ;
                 vision K/V] (`forward_packed`; the text tower ran once, before timing);
  ditserve-full  diffusers' call on our model (both towers, as diffusers runs every step);
  diffusers      `Cosmos3OmniTransformer` with an attention backend of diffusers' dispatcher.
`--cfg` times a guided step instead: ditserve's one packed forward over the prompt and the
negative prompt (a different text length) vs two diffusers calls, as its pipeline makes them.
Per variant: median of --repeats after warm-up, peak memory, MFU of the FLOPs that variant
computes against the bf16 matrix rate measured in this run, max relative error vs diffusers.

    python bench/cosmos3.py --markdown docs/performance.md --json docs/cosmos3-nano-h200.json
    python bench/cosmos3.py --tiny     # a CPU smoke run: tiny config, 64x64x5
    python bench/cosmos3.py --variants ditserve:auto:compile,diffusers:native:compile --profile
                                       # and where each compiled forward's GPU time goes, by kernel kind
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import sys
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from report import publish, shown_args
from wan import matmul_rate, time_ms  # bench/wan.py: timing and the matrix rate, on a GPU or CPU
from profile_flux import breakdown  # bench/profile_flux.py: GPU time by kernel kind

TINY = {"hidden_size": 64, "head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 96, "num_hidden_layers": 2, "vocab_size": 1000, "rope_axes_dim": [4, 2, 2]}
DEFAULT_VARIANTS = ("ditserve:auto,ditserve-full:auto,diffusers:native,diffusers:_native_flash,"
                    "ditserve:auto:compile,diffusers:native:compile")


def layer_flops(cfg: Any, q_tokens: int, kv_tokens: int, causal: bool = False) -> float:
    """One tower of one layer: projections, MLP, attention matmuls (multiply-add = 2 FLOPs)."""
    d, inner, kv_inner = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    mlp = 3 if cfg.hidden_act == "silu" else 2
    linear = 2 * q_tokens * d * (2 * inner + 2 * kv_inner + mlp * cfg.intermediate_size)
    attention = 4 * q_tokens * kv_tokens * inner * (0.5 if causal else 1.0)
    return linear + attention


def forward_flops(cfg: Any, text: int, vision: int, *, full: bool) -> float:
    """The vision tower over all layers (+ the text tower when `full`)."""
    flops = layer_flops(cfg, vision, text + vision) + (layer_flops(cfg, text, text, causal=True) if full else 0)
    return cfg.num_hidden_layers * flops


def peak_bytes(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")


def diffusers_inputs(ids: torch.Tensor, latents: torch.Tensor, timestep: int, fps: float) -> dict[str, Any]:
    """One prompt and one video, laid out as Cosmos3OmniPipeline lays them out for the transformer."""
    from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import (
        get_3d_mrope_ids_text_tokens,
        get_3d_mrope_ids_vae_tokens,
    )

    text_len, (frames, height, width) = ids.numel(), latents.shape[2:]
    grid = (frames, -(-height // 2), -(-width // 2))
    tokens = math.prod(grid)
    text_ids, offset = get_3d_mrope_ids_text_tokens(text_len, 0, use_float_positions=True)
    vision_ids, _ = get_3d_mrope_ids_vae_tokens(*grid, temporal_offset=offset + 15000, fps=fps, base_fps=24.0,
                                                temporal_compression_factor=4)
    device = latents.device
    vision = torch.arange(text_len, text_len + tokens, device=device)
    return {"input_ids": ids, "text_indexes": torch.arange(text_len, device=device),
            "position_ids": torch.cat([text_ids, vision_ids], dim=1).to(device), "und_len": text_len,
            "sequence_length": text_len + tokens, "vision_tokens": [latents], "vision_token_shapes": [grid],
            "vision_sequence_indexes": vision, "vision_mse_loss_indexes": vision,
            "vision_timesteps": torch.full((tokens,), timestep, device=device),
            "vision_noisy_frame_indexes": [torch.arange(frames, device=device)], "return_dict": False}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--frames", type=int, default=189)
    parser.add_argument("--text-len", type=int, default=256, help="prompt tokens (template included)")
    parser.add_argument("--cfg", action="store_true", help="a guided step: prompt + negative prompt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--tiny", action="store_true", help="tiny config at 64x64x5 (CPU smoke run)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--profile", action="store_true", help="GPU time by kernel kind of each compiled variant")
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.tiny:
        print("bench/cosmos3.py needs a CUDA GPU (or --tiny for a CPU smoke run)", file=sys.stderr)
        return 2
    if args.tiny:
        args.height, args.width, args.frames, args.text_len = 64, 64, 5, 16
        args.repeats = min(args.repeats, 2)
    from diffusers import Cosmos3OmniTransformer as Theirs

    from ditserve.loading import instantiate_on_meta
    from ditserve.models.cosmos3 import Cosmos3OmniTransformer as Ours
    from ditserve.models.cosmos3 import Cosmos3Sample, vision_position_ids

    dtype = torch.bfloat16
    rate = matmul_rate(device, dtype)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no float32 copy of 15B weights
    try:
        with torch.device(device):
            theirs = Theirs(**(TINY if args.tiny else {})).eval()
    finally:
        torch.set_default_dtype(previous)
    config = dict(theirs.config)
    ours = instantiate_on_meta(lambda: Ours.from_config(config))
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)  # the same tensors, no copy
    ours = ours.to(device).eval()
    cfg = ours.config

    gen = torch.Generator(device=device).manual_seed(0)
    latent = (48, (args.frames - 1) // 4 + 1, args.height // 16, args.width // 16)
    latents = torch.randn(1, *latent, device=device, dtype=dtype, generator=gen)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), device=device, generator=gen)
               for n in ([args.text_len, args.text_len // 2] if args.cfg else [args.text_len])]
    timestep, fps = 500, 24.0
    inputs = [diffusers_inputs(ids, latents, timestep, fps) for ids in prompts]
    grid = inputs[0]["vision_token_shapes"][0]
    vision = math.prod(grid)
    with torch.inference_mode():
        texts = ours.encode_text(prompts)
    samples = [Cosmos3Sample(latents[0], torch.tensor(timestep, device=device), text,
                             vision_position_ids(grid, text.length, fps, cfg, 4).to(device)) for text in texts]
    flops = {full: sum(forward_flops(cfg, ids.numel(), vision, full=full) for ids in prompts) for full in (False, True)}
    what = "a guided step (prompt + negative prompt)" if args.cfg else "one forward"
    print(f"{vision} vision tokens, {'/'.join(str(p.numel()) for p in prompts)} text; {what}: "
          f"{flops[False] / 1e12:.1f} TFLOP (vision tower), {flops[True] / 1e12:.1f} TFLOP (both towers); "
          f"bf16 matmul {rate / 1e12:.1f} TFLOP/s", flush=True)

    runs: dict[str, Callable[[], list[torch.Tensor]]] = {
        "ditserve": lambda: ours.forward_packed(samples),
        "ditserve-full": lambda: [ours(**i)[0][0][0] for i in inputs],
        "diffusers": lambda: [theirs(**i)[0][0][0] for i in inputs],
    }
    variants = [(v.split(":") + [""])[:3] for v in args.variants.split(",")]
    if args.tiny:
        variants = [v for v in variants if v[2] != "compile"]
    variants.sort(key=lambda v: v[2] == "compile")
    rows, outputs, compiled = [], {}, set()
    for lib, backend, mode in variants:
        if lib not in runs:
            print(f"skip {lib}: not one of {sorted(runs)}", flush=True)
            continue
        model = theirs if lib == "diffusers" else ours
        try:
            model.set_attention_backend(backend)
            if mode == "compile" and id(model) not in compiled:
                model.compile_blocks() if model is ours else model.compile_repeated_blocks(fullgraph=True)
                compiled.add(id(model))
            with torch.inference_mode():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                ms = time_ms(runs[lib], args.repeats, warmup=3 if mode else 1, device=device)
                outputs[(lib, backend, mode)] = [o.float() for o in runs[lib]()]
        except Exception as err:  # noqa: BLE001 - a backend missing or out of memory here is a result
            print(f"skip {lib}:{backend}{':' + mode if mode else ''}: {type(err).__name__}: {err}", flush=True)
            gc.collect()
            continue
        full = lib != "ditserve"
        row = {"variant": f"{lib} ({backend}{', compiled' if mode else ''})", "forward_ms": ms,
               "tflop": flops[full] / 1e12, "mfu": flops[full] / (ms * 1e-3) / rate,
               "peak_gib": peak_bytes(device) / 2**30}
        if lib != "diffusers":
            row["attention_choices"] = sorted(set(ours.attention_selector.choices.values()))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.profile and mode and device.type == "cuda":
            with torch.inference_mode():
                breakdown(row["variant"], runs[lib], repeats=3, top=20)
        gc.collect()

    ref = next((out for (lib, _, mode), out in outputs.items() if lib == "diffusers" and not mode), None)
    base = next((r for r in rows if r["variant"].startswith("diffusers (") and "compiled" not in r["variant"]), None)
    name = "tiny config" if args.tiny else "Cosmos3-Nano-sized (diffusers' default config)"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        (f"#### Cosmos3 forward, {name}, {args.width}x{args.height}x{args.frames} ({vision} vision + "
        f"{'/'.join(str(p.numel()) for p in prompts)} text tokens), {what}, bf16 — {datetime.date.today()}, "
        f"{device_name}, torch {torch.__version__}"),
        "",
        (f"Command: `python bench/cosmos3.py {shown_args()}`. Random weights; `ditserve` is ditserve's step (the "
        f"vision tower on kept text K/V: {flops[False] / 1e12:.0f} TFLOP), the others run both towers "
        f"({flops[True] / 1e12:.0f} TFLOP); MFU against the bf16 matmul rate measured in this run: "
        f"{rate / 1e12:.0f} TFLOP/s."),
        "",
        "| variant | forward (ms) | vs diffusers default | MFU | peak GiB | max rel err vs diffusers |",
        "|---|---|---|---|---|---|",
    ]
    for (key, out), r in zip(outputs.items(), rows):
        err = "–" if ref is None else f"{max(((o - t).abs().max() / t.abs().max()).item() for o, t in zip(out, ref)):.2e}"
        speed = f"{base['forward_ms'] / r['forward_ms']:.2f}x" if base else "–"
        choice = " → " + "/".join(r["attention_choices"]) if r.get("attention_choices") else ""
        lines.append(f"| {r['variant']}{choice} | {r['forward_ms']:.1f} | {speed} | {r['mfu']:.0%} | "
                     f"{r['peak_gib']:.1f} | {err} |")
    publish("\n".join(lines) + "\n", rows, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
