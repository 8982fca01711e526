"""Whole Wan generation on one GPU: ditserve vs diffusers' WanPipeline, same components.

Real-size components with random weights (the published transformer and VAE configs of
Wan2.1-T2V-1.3B, or of Wan2.2-TI2V-5B with `--config ti2v-5b`, a UMT5-XXL-sized text encoder;
a small offline tokenizer), bf16 (VAE float32, as both pipelines recommend), 50 steps, CFG 5.0,
at the model's published size (480x832x81; TI2V: 704x1280x121). Both pipelines share the text
encoder and VAE objects; ditserve's DiT holds the same weights as diffusers'. Per variant:
time per step (median and spread over the steps), total, peak GPU memory above what was
resident before the run, and PSNR of the frames against diffusers'.

Variant `ditserve:cache=SETTING` runs with step caching (`--cache`; write `uniform;N` for
`uniform:N`): its step median then mixes computed and reused steps, so compare totals.

Variant `ditserve:fp8` quantizes our DiT's block linear layers to FP8 (`quantize="fp8"`), in place:
list it after the exact variants. Variant part `vae=bf16` turns the shared VAE to bf16 (the opt-in
decode) for that variant and every later one (diffusers' too): list those last. Parts combine, with
`compile` last: `ditserve:cache=uniform;3:vae=bf16:compile` is every lever that pays at this size.
Variant part `attn=BACKEND` pins our DiT's attention for that variant only (e.g. `ditserve:fp8:attn=triton_fp8:compile`,
FP8 linear layers and FP8 attention).
Every ditserve variant's PSNR and max error against the first exact ditserve variant (`ditserve`
or `ditserve:compile`) are reported too (the exact path on the same seed).

Variant `dense-loop` is the denoising loop `Pipeline.generate` ran before it became the
batching engine with one request (one dense batch-2 forward per step, same components): the
reference for "a single request through the shared engine path costs nothing".

    python bench/wan_pipeline.py --variants diffusers,ditserve,dense-loop,ditserve:compile,dense-loop:compile \
        --markdown docs/performance.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
sys.path.insert(1, __file__.rsplit("/", 2)[0] + "/tests")  # tests/helpers: the tiny checkpoint builders
from report import psnr, publish, shown_args  # noqa: E402  (bench/report.py)
from wan import COMMON, NAMES, WAN_CONFIGS  # noqa: E402  (bench/wan.py)

UMT5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=256384,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                relative_attention_max_distance=128, dropout_rate=0.0)


# Wan2.2-TI2V-5B's VAE (Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json; latents_mean/std left at random values)
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0, is_residual=True,
                 in_channels=12, out_channels=12, patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
                 latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
PRESETS = {  # config -> (DiT config key, VAE config, flow shift, expand_timesteps, (height, width, frames))
    "1.3b": ("1.3b", {}, 3.0, False, (480, 832, 81)),
    "ti2v-5b": ("ti2v-5b", WAN22_VAE, 5.0, True, (704, 1280, 121)),
}


def build_components(device: torch.device, config: str = "1.3b"):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from helpers.checkpoints import build_tiny_t5_tokenizer

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no float32 copy of 5.7B text-encoder weights
    try:
        with torch.device(device):
            text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL)).eval()
            transformer = WanTransformer3DModel(**{**COMMON, **WAN_CONFIGS[PRESETS[config][0]]}).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.device(device):
        vae = AutoencoderKLWan(**PRESETS[config][1]).eval()  # {}: the Wan2.1 VAE config is diffusers' default
    scheduler_config = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                            flow_shift=PRESETS[config][2])
    return dict(tokenizer=build_tiny_t5_tokenizer(), text_encoder=text_encoder, transformer=transformer, vae=vae,
                new_scheduler=lambda: UniPCMultistepScheduler(**scheduler_config))


def dense_loop(pipe, request: dict) -> tuple[np.ndarray, float, list[float]]:
    """The pre-engine `generate`: text, noise, a scheduler loop of dense CFG forwards, decode; (frames, total, steps)."""
    from ditserve.pipelines.latents import seeded_noise

    req = pipe.validate(**request, seed=0)
    device, model = pipe.device, pipe.transformer
    with torch.no_grad():
        torch.cuda.synchronize()
        start = time.perf_counter()
        text = pipe.encode_text([req.prompt, req.negative_prompt])
        latents = seeded_noise(pipe.latent_shape(req), req.seed, device, torch.float32)
        scheduler = pipe.new_scheduler()
        scheduler.set_timesteps(req.num_inference_steps, device=device)
        scheduler.set_begin_index(0)
        marks = [torch.cuda.Event(enable_timing=True)]
        marks[0].record()
        for t in scheduler.timesteps:
            x = latents.to(model.dtype)
            cond, uncond = model(torch.cat([x, x]), t.expand(2), text, return_dict=False)[0].chunk(2)
            latents = scheduler.step(uncond + req.guidance_scale * (cond - uncond), t, latents, return_dict=False)[0]
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
        frames = pipe.decode_batch(latents)[0]
        torch.cuda.synchronize()
    steps = [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
    return frames, time.perf_counter() - start, steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(PRESETS), default="1.3b")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--height", type=int, default=None, help="default: the model's published size")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num-frames", type=int, default=None)
    parser.add_argument("--variants", default="diffusers,ditserve,ditserve:compile")
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/wan_pipeline.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import diffusers

    from ditserve.engine.step_cache import parse_step_cache
    from ditserve.loading import instantiate_on_meta
    from ditserve.models.wan import WanTransformer3DModel as OurDiT
    from ditserve.pipelines.wan import WanPipeline as OurPipeline

    device = torch.device("cuda")
    dit_key, _, _, expand, (height, width, frames) = PRESETS[args.config]
    args.height, args.width, args.num_frames = args.height or height, args.width or width, args.num_frames or frames
    parts = build_components(device, args.config)
    theirs = diffusers.WanPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"],
                                   transformer=parts["transformer"], vae=parts["vae"], scheduler=parts["new_scheduler"](),
                                   expand_timesteps=expand)
    our_dit = instantiate_on_meta(lambda: OurDiT(**{**COMMON, **WAN_CONFIGS[dit_key]}))
    our_dit.load_state_dict(parts["transformer"].state_dict(), strict=True, assign=True)
    ours = OurPipeline(transformers=[our_dit.to(device).eval()], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                       vae=parts["vae"], new_scheduler=parts["new_scheduler"], device=device, dtype=torch.bfloat16,
                       expand_timesteps=expand)
    request = dict(prompt="a red circle moving left on a blue background", negative_prompt="blurry, low quality",
                   height=args.height, width=args.width, num_frames=args.num_frames,
                   num_inference_steps=args.steps, guidance_scale=5.0)

    rows, frames = [], {}
    compiled = quantized = False
    for variant in args.variants.split(","):
        decode = float("nan")  # the VAE decode's seconds, where the pipeline reports it (ditserve's)
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step_ends: list[float] = []
        if variant == "diffusers":

            def on_step(pipe, i, t, kwargs):
                torch.cuda.synchronize()
                step_ends.append(time.perf_counter())
                return kwargs

            torch.cuda.synchronize()
            start = time.perf_counter()
            out = theirs(**request, generator=torch.Generator(device).manual_seed(0), output_type="np",
                         callback_on_step_end=on_step).frames[0]
            torch.cuda.synchronize()
            total = time.perf_counter() - start
            steps = np.diff([start, *step_ends])[1:]  # drop step 0: it includes text encoding
        else:
            if ":vae=bf16" in variant and parts["vae"].dtype != torch.bfloat16:
                parts["vae"].to(torch.bfloat16)  # shared with diffusers' pipeline: later variants decode in bf16 too
            if ":fp8" in variant and not quantized:
                if compiled:
                    raise SystemExit("list ditserve:fp8 variants before compiled ones (both change the DiT in place)")
                ours.quantize()
                quantized = True
            if variant.endswith(":compile") and not compiled:
                t0 = time.perf_counter()
                ours.compile()
                ours.generate(**{**request, "num_inference_steps": 2}, seed=0)  # compile + warm-up
                print(f"compile + warm-up: {time.perf_counter() - t0:.1f} s", flush=True)
                torch.cuda.reset_peak_memory_stats()
                compiled = True
            if variant.startswith("dense-loop"):
                out, total, steps = dense_loop(ours, request)
            else:
                cache = next((part[len("cache="):] for part in variant.split(":") if part.startswith("cache=")), None)
                attn = next((part[len("attn="):] for part in variant.split(":") if part.startswith("attn=")), None)
                ours.step_cache = parse_step_cache(cache and cache.replace(";", ":"))  # ditserve:cache=uniform;3
                for denoiser in ours.denoisers() if attn else ():
                    denoiser.set_attention_backend(attn)
                result = ours.generate(**request, seed=0)
                for denoiser in ours.denoisers() if attn else ():
                    denoiser.set_attention_backend("auto")
                ours.step_cache = None
                out, total, steps = result.frames, result.timings["total_s"], result.timings["per_step_s"]
                decode = result.timings.get("decode_s", float("nan"))
        frames[variant] = out
        row = {
            "variant": variant,
            "step_median_s": statistics.median(steps),
            "step_min_s": min(steps),
            "step_max_s": max(steps),
            "total_s": total,
            "peak_over_resident_gib": (torch.cuda.max_memory_allocated() - resident) / 2**30,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "decode_s": decode,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["variant"] == "diffusers"), None)
    exact = next((r["variant"] for r in rows if r["variant"] in ("ditserve", "ditserve:compile")), None)
    lines = [
        f"### {NAMES[dit_key]} whole generation, {args.height}x{args.width}x{args.num_frames}, {args.steps} steps, CFG 5.0, bf16 — "
        f"{datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}, diffusers {diffusers.__version__}",
        "",
        f"Command: `python bench/wan_pipeline.py {shown_args()}`. Random weights, real-size components (UMT5-XXL-sized "
        "text encoder, the model's VAE in float32, its DiT); both pipelines share the text encoder and VAE. Peak memory is "
        "measured above what was resident before the run (all models stay loaded).",
        "",
        "| variant | step median (s) | step min–max (s) | total (s) | decode (s, share of total) | speed-up vs diffusers | "
        f"peak above resident (GiB) | PSNR vs diffusers (dB) | PSNR vs {exact or 'ditserve'} (dB) | max error vs it |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = f"{base['total_s'] / r['total_s']:.2f}x" if base else "–"
        similarity = f"{psnr(frames[r['variant']], frames['diffusers']):.1f}" if base else "–"
        r["exact_reference"] = exact
        r["psnr_vs_ditserve_db"] = None if exact is None else psnr(frames[r["variant"]], frames[exact])
        r["max_err_vs_ditserve"] = None if exact is None else float(
            np.abs(np.asarray(frames[r["variant"]], np.float64) - np.asarray(frames[exact], np.float64)).max())
        vs_exact = "–" if exact is None else f"{r['psnr_vs_ditserve_db']:.1f}"
        worst = "–" if r["max_err_vs_ditserve"] is None else f"{r['max_err_vs_ditserve']:.3f}"
        lines.append(
            f"| {r['variant']} | {r['step_median_s']:.3f} | {r['step_min_s']:.3f}–{r['step_max_s']:.3f} | {r['total_s']:.1f} | "
            f"{_decode_cell(r)} | {speed} | {r['peak_over_resident_gib']:.1f} | {similarity} | {vs_exact} | {worst} |"
        )
    publish("\n".join(lines) + "\n", rows, args.markdown, args.json)
    return 0


def _decode_cell(row: dict) -> str:
    if row["decode_s"] != row["decode_s"]:  # nan: not reported by this variant's pipeline
        return "–"
    return f"{row['decode_s']:.2f} ({row['decode_s'] / row['total_s']:.0%})"


if __name__ == "__main__":
    sys.exit(main())
