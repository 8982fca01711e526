"""Wan DiT forward on one GPU: ditserve vs diffusers' WanTransformer3DModel, same weights.

Random weights built from the published Wan2.1-T2V and Wan2.2 transformer configs (bf16);
`a14b` is one expert of Wan2.2-T2V-A14B (each of its two experts has the 14B architecture),
`ti2v-5b` is Wan2.2-TI2V-5B (48 latent channels, 16x VAE). For TI2V, diffusers' own pipeline
passes one timestep per token (`[B, S]`, all equal for text-to-video) and ours one per sample;
each model gets what its pipeline passes. For each
variant: one forward (batch 1) and a CFG pair (batch 2), median of --repeats after warm-up,
peak GPU memory, and model FLOPs utilisation against the bf16 matrix-product rate measured in
this run. Our output is compared with diffusers' on the same inputs.

    python bench/wan.py --config 1.3b --markdown docs/performance.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from report import publish, shown_args  # bench/report.py

WAN_CONFIGS = {
    # published Wan-AI/Wan2.1-T2V-{1.3B,14B}, Wan2.2-T2V-A14B and Wan2.2-TI2V-5B transformer/config.json values
    "1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
    "a14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
    "ti2v-5b": dict(num_attention_heads=24, attention_head_dim=128, ffn_dim=14336, num_layers=30, in_channels=48,
                    out_channels=48),
}
NAMES = {"1.3b": "Wan2.1-T2V-1.3B", "14b": "Wan2.1-T2V-14B", "a14b": "Wan2.2-T2V-A14B (one expert)",
         "ti2v-5b": "Wan2.2-TI2V-5B"}
VAE_SPATIAL = {"ti2v-5b": 16}  # the Wan2.2 VAE; 8 for the others
COMMON = dict(
    patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
SIZES = {"1.3b": (480, 832, 81), "14b": (720, 1280, 81), "a14b": (720, 1280, 81), "ti2v-5b": (704, 1280, 121)}
TEXT_LEN = 512


def forward_flops(cfg: dict, tokens: int, text_len: int = TEXT_LEN) -> float:
    """Linear layers + attention matmuls of one sample's forward (multiply-add = 2 FLOPs)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    per_block = (
        2 * tokens * d * d * 4  # self-attention q, k, v, o
        + 4 * tokens * tokens * d  # self-attention scores and weighted sum
        + 2 * tokens * d * d * 2 + 2 * text_len * d * d * 2  # cross-attention q, o; k, v of the text
        + 4 * tokens * text_len * d  # cross-attention
        + 2 * tokens * d * cfg["ffn_dim"] * 2  # feed-forward
    )
    return per_block * cfg["num_layers"]


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """The measured rate (FLOP/s) of one square matrix product: 8192 on a GPU, 512 on a CPU (smoke runs)."""
    n = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / (time_ms(lambda: a @ b, repeats=20, warmup=3, device=device) * 1e-3)


def time_ms(fn: Callable[[], object], repeats: int, warmup: int = 2, device: torch.device | None = None) -> float:
    """Median time of `fn` in ms: CUDA events (the default), or the host clock for a CPU `device`."""
    on_cpu = device is not None and device.type != "cuda"
    for _ in range(warmup):
        fn()
    if not on_cpu:
        torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        if on_cpu:
            began = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - began) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def build_models(cfg: dict, device: torch.device, need_diffusers: bool):
    """diffusers' model with random weights, and ours loaded from its state dict (shared values)."""
    from ditserve.loading import instantiate_on_meta
    from ditserve.models.wan import WanTransformer3DModel as Ours

    torch.manual_seed(0)
    ours = instantiate_on_meta(lambda: Ours(**cfg))
    if need_diffusers:
        from diffusers import WanTransformer3DModel as Theirs

        with torch.device(device):
            theirs = Theirs(**cfg).to(torch.bfloat16).eval()
        ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    else:
        theirs = None
        with torch.device(device):
            ours = Ours(**cfg).to(torch.bfloat16)
    ours = ours.to(device, torch.bfloat16).eval()
    ours.fuse_qkv_projections()  # what WanPipeline does to the model it is given
    return ours, theirs


def _cell(value: float | None, spec: str) -> str:
    """A table cell: '–' for a figure not measured (e.g. the CFG pair under --no-cfg)."""
    return "–" if value is None or value != value else format(value, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(WAN_CONFIGS), default="1.3b")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-diffusers", action="store_true", help="time ditserve only (e.g. 14B where two copies do not fit)")
    parser.add_argument("--no-cfg", action="store_true", help="time the single forward only, not the CFG pair (14B: saves minutes)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--variants",
        default="ditserve:auto,ditserve:sdpa,diffusers:native,diffusers:_native_cudnn,ditserve:auto:compile,diffusers:native:compile,diffusers:_native_cudnn:compile",
        help="comma-separated LIB:ATTENTION[:compile]; compiled variants run after the eager ones (compiling changes the model in place)",
    )
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/wan.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    cfg = {**COMMON, **WAN_CONFIGS[args.config]}
    height, width, frames = SIZES[args.config]
    spatial = VAE_SPATIAL.get(args.config, 8)
    lat_shape = (cfg["in_channels"], (frames - 1) // 4 + 1, height // spatial, width // spatial)
    tokens = lat_shape[1] * (lat_shape[2] // 2) * (lat_shape[3] // 2)
    flops = forward_flops(cfg, tokens)
    rate = matmul_rate(device)
    print(f"config {args.config}: {tokens} tokens, {flops / 1e12:.1f} TFLOP per sample; bf16 matmul {rate / 1e12:.0f} TFLOP/s", flush=True)

    variants = [(v.split(":") + [""])[:3] for v in args.variants.split(",")]
    variants.sort(key=lambda v: v[2] == "compile")  # eager first: compiling is in place
    need_diffusers = not args.no_diffusers and any(lib == "diffusers" for lib, _, _ in variants)
    ours, theirs = build_models(cfg, device, need_diffusers)
    gen = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(2, *lat_shape, device=device, dtype=torch.bfloat16, generator=gen)
    text = torch.randn(2, TEXT_LEN, 4096, device=device, dtype=torch.bfloat16, generator=gen)
    timestep = torch.tensor([999.0, 999.0], device=device)
    per_token = args.config == "ti2v-5b"  # diffusers' TI2V pipeline: [B, S] timesteps
    token_timestep = timestep[:, None].expand(2, tokens).contiguous()

    rows, outputs = [], {}
    compiled: set[str] = set()
    for lib, backend, mode in variants:
        if lib == "diffusers" and theirs is None:
            continue
        model = ours if lib == "ditserve" else theirs
        try:
            model.set_attention_backend(backend)
            if mode == "compile" and lib not in compiled:
                if lib == "ditserve":
                    model.compile_blocks()
                else:
                    model.compile_repeated_blocks(fullgraph=True)
                compiled.add(lib)
        except Exception as err:  # noqa: BLE001 - a peer's backend missing here is a result, not a crash
            print(f"skip {lib}:{backend}: {err}", flush=True)
            continue
        row = {"variant": f"{lib} ({backend}{', compiled' if mode else ''})"}
        with torch.inference_mode():
            for label, batch in (("forward", 1),) if args.no_cfg else (("forward", 1), ("cfg_pair", 2)):
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.empty_cache()

                t = token_timestep if per_token and lib == "diffusers" else timestep

                def run(batch=batch, t=t):
                    return model(latents[:batch], t[:batch], text[:batch], return_dict=False)[0]

                try:
                    ms = time_ms(run, args.repeats, warmup=args.warmup + (1 if mode else 0))
                except Exception as err:  # noqa: BLE001
                    print(f"{lib}:{backend} {label} failed: {err}", flush=True)
                    ms = float("nan")
                row[f"{label}_ms"] = ms
                row[f"{label}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                row[f"{label}_mfu"] = batch * flops / (ms * 1e-3) / rate
            outputs[row["variant"]] = run(1).float()
        if lib == "ditserve":
            row["attention_choices"] = sorted(set(model.attention_selector.choices.values()))
        rows.append(row)
        print(json.dumps(row), flush=True)
        gc.collect()

    ref_key = next((k for k in outputs if k.startswith("diffusers")), None)
    if ref_key:
        ref = outputs[ref_key]
        for row in rows:
            out = outputs[row["variant"]]
            row["rel_err_vs_" + ref_key] = ((out - ref).abs().max() / ref.abs().max()).item()
    base = next((r for r in rows if r["variant"] == "diffusers (native)"), None)
    lines = [
        f"### {NAMES[args.config]} DiT forward, {height}x{width}x{frames} ({tokens} tokens), bf16 — "
        f"{datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}",
        "",
        f"Command: `python bench/wan.py {shown_args()}`. Random weights from the published config; "
        f"{flops / 1e12:.0f} TFLOP per sample (linear layers + attention); bf16 matmul rate measured in this run: {rate / 1e12:.0f} TFLOP/s.",
        "",
        "| variant | forward (ms) | vs diffusers default | MFU | peak GiB | CFG pair (ms) | CFG pair peak GiB | max err vs diffusers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = f"{base['forward_ms'] / r['forward_ms']:.2f}x" if base else "–"
        err = next((f"{v:.2e}" for k, v in r.items() if k.startswith("rel_err")), "–")
        lines.append(
            f"| {r['variant']}{' → ' + '/'.join(r['attention_choices']) if 'attention_choices' in r else ''} | {r['forward_ms']:.0f} | {speed} | "
            f"{r['forward_mfu']:.0%} | {r['forward_peak_gib']:.1f} | {_cell(r.get('cfg_pair_ms'), '.0f')} | "
            f"{_cell(r.get('cfg_pair_peak_gib'), '.1f')} | {err} |"
        )
    publish("\n".join(lines) + "\n", rows, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
