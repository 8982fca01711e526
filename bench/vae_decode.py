"""The Wan VAE decode: which way of running it is fastest, and what each costs in exactness.

diffusers' `AutoencoderKLWan` (the Wan2.1 config; `--config wan2.2` for the 48-channel one), random
weights, latents of one video at the model's published size (Wan2.1-1.3B: 480x832x81). Variants:

- `fp32`: ditserve's default decode (`pipelines.wan_vae.decode_videos`, float32), the reference;
- `fp32:channels_last`: the VAE's weights and input in `channels_last_3d` memory format;
- `fp32:cudnn_benchmark`: `torch.backends.cudnn.benchmark` on (cuDNN times its convolution algorithms);
- `fp32:compile`: the decoder `torch.compile`d;
- `bf16`, `bf16:compile`...: the opt-in bf16 decode (`--vae-dtype bf16`).

Per variant: median time over --repeats after warm-up, peak memory, and PSNR / max error of the
frames against `fp32`. Run on a GPU; on a CPU (`--device cpu --size 32x32x5`) it is a smoke run.

    python bench/vae_decode.py --variants fp32,fp32:channels_last,fp32:cudnn_benchmark,fp32:compile,bf16,bf16:compile
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
from report import psnr, publish, shown_args  # noqa: E402  (bench/report.py)

WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0, is_residual=True,
                 in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                 clip_output=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["wan2.1", "wan2.2"], default="wan2.1")
    parser.add_argument("--size", default="480x832x81", help="HEIGHTxWIDTHxFRAMES of the video decoded")
    parser.add_argument("--variants", default="fp32,fp32:channels_last,fp32:cudnn_benchmark,fp32:compile,bf16,bf16:compile")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()
    from diffusers import AutoencoderKLWan

    from ditserve.pipelines.wan_vae import decode_videos, latent_stats

    device = torch.device(args.device)
    height, width, frames = (int(v) for v in args.size.split("x"))
    torch.manual_seed(0)
    reference_vae = AutoencoderKLWan(**(WAN22_VAE if args.config == "wan2.2" else {})).eval()
    spatial, z = (16, 48) if args.config == "wan2.2" else (8, 16)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, z, (frames - 1) // 4 + 1, height // spatial, width // spatial, generator=gen)

    rows, outputs = [], {}
    for variant in args.variants.split(","):
        dtype_name, *options = variant.split(":")
        vae = AutoencoderKLWan(**(WAN22_VAE if args.config == "wan2.2" else {})).eval()
        vae.load_state_dict(reference_vae.state_dict())
        vae.to(device, torch.bfloat16 if dtype_name == "bf16" else torch.float32)
        if "channels_last" in options:  # the 3D convolutions' weights (the only 5-D tensors)
            for param in vae.parameters():
                if param.dim() == 5:
                    param.data = param.data.to(memory_format=torch.channels_last_3d)
        torch.backends.cudnn.benchmark = "cudnn_benchmark" in options
        if "compile" in options:
            vae.decoder.compile()
        mean, inv_std = latent_stats(vae, z, device)

        def decode(vae=vae, mean=mean, inv_std=inv_std) -> np.ndarray:
            return decode_videos(vae, latents, mean, inv_std, device)[0]

        decode()  # warm-up: cuDNN's algorithm search, compilation
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = decode()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        outputs[variant] = out
        row = {"variant": variant, "decode_s": statistics.median(seconds),
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del vae
    torch.backends.cudnn.benchmark = False
    base = rows[0]
    for row in rows:
        out, ref = outputs[row["variant"]], outputs[base["variant"]]
        row["psnr_db"] = psnr(out, ref)
        row["max_err"] = float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).max())
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [
        f"#### Wan VAE decode ({args.config} config), {args.size} — {datetime.date.today()}, {name}, torch {torch.__version__}",
        "",
        f"Command: `python bench/vae_decode.py {shown_args()}`. Random weights; one video's latents; median of "
        f"{args.repeats} decodes after a warm-up; errors against `{base['variant']}`.",
        "",
        f"| variant | decode (s) | vs {base['variant']} | peak GiB | PSNR (dB) | max error |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['decode_s']:.3f} | {base['decode_s'] / r['decode_s']:.2f}x | "
                     f"{r['peak_gib']:.1f} | {r['psnr_db']:.1f} | {r['max_err']:.2e} |")
    publish("\n".join(lines) + "\n", rows, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
