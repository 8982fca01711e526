"""Train the tiny Wan2.1 model from a seed and save it as a diffusers-format pipeline folder.

    python tools/train_tiny.py --out DIR --seed 0 --threads 1     (the shipped model: 41 min)
    python tools/train_tiny.py --out DIR --seed 0 --device cuda

Stages: (1) the VAE as an autoencoder of rendered clips (see `train_vae`); its latent
mean/std go into its config; (2) a fixed set of clips is encoded once with the trained VAE;
(3) the DiT and the text encoder train together by flow matching on those latents (see
`train_dit`). Only
training scenes are rendered; the held-out scenes never are. The folder is written by
`diffusers.WanPipeline.save_pretrained`, with `training.json` (settings, losses, times)
beside model_index.json.

Everything random comes from one CPU generator seeded with `--seed` (and torch's global
seed, for weight initialisation), so a run is reproducible on the same device type, up to
the non-determinism of GPU kernels.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ditserve.pipelines.registry import REQUEST_DEFAULTS_FILE
from ditserve.tiny.data import FRAMES, SIZE, held_out_scenes, train_scenes
from ditserve.tiny.embedded import GENERATION

from .arch import FLOW_SHIFT, scheduler_config, text_encoder_config, transformer_config, vae_config
from .text import build_tokenizer
from .train_dit import encode_latents, train_dit
from .train_vae import latent_statistics, train_vae

__all__ = ["TrainSettings", "main", "train_tiny_model"]


@dataclass(frozen=True)
class TrainSettings:
    """Everything a run depends on besides the code (recorded in training.json).

    The defaults are the recipe of the shipped model (~45 minutes on one CPU core).
    """

    seed: int = 0
    vae_base_dim: int = 16  # stage 1: the VAE (arch.vae_config), on fresh clips every step
    vae_num_res_blocks: int = 0
    vae_steps: int = 2000
    vae_batch: int = 8
    vae_frames: int = FRAMES  # frames per VAE training clip (see train_vae)
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-4
    vae_object_weight: float = 10.0  # object pixels weigh this much more in the reconstruction loss
    stats_clips: int = 1024  # clips for the latent mean / std
    latent_clips: int = 16384  # stage 2: clips encoded once for the DiT
    dit_steps: int = 5000  # stage 3: the DiT and the text encoder
    dit_batch: int = 64
    dit_lr: float = 1e-3
    text_lr: float = 5e-4
    drop_prob: float = 0.1  # share of samples trained on the empty prompt (classifier-free guidance)
    ema_decay: float = 0.999
    shift: float = FLOW_SHIFT
    save_dtype: str = "float16"  # weights as stored in the folder
    max_minutes_vae: float | None = None
    max_minutes_dit: float | None = None


QUICK = dict(vae_steps=20, vae_batch=4, stats_clips=32, latent_clips=128, dit_steps=20, dit_batch=16)


def _components(settings: TrainSettings) -> dict[str, Any]:
    """Freshly initialised tokenizer, text encoder, DiT, VAE and scheduler (weights from the seed)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tokenizer()
    torch.manual_seed(settings.seed)
    vae = AutoencoderKLWan(**vae_config(settings.vae_base_dim, settings.vae_num_res_blocks))
    transformer = WanTransformer3DModel(**transformer_config())
    text_encoder = UMT5EncoderModel(UMT5Config(**text_encoder_config(len(tokenizer))))
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                scheduler=UniPCMultistepScheduler(**scheduler_config()))


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def train_tiny_model(out: str | Path, settings: TrainSettings, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Train and write the pipeline folder `out` (must be absent or empty); returns the training record."""
    from diffusers import WanPipeline

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty folder; refusing to write a model into it")
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    began = time.perf_counter()

    def log(msg: str) -> None:
        tqdm.write(f"[{time.perf_counter() - began:6.0f}s] {msg}")

    parts = _components(settings)
    generator = torch.Generator().manual_seed(settings.seed)
    scenes = train_scenes()
    vae = parts["vae"].to(device)
    minutes = lambda m: None if m is None else 60.0 * m  # noqa: E731
    record: dict[str, Any] = {"settings": asdict(settings), "device": str(device),
                              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                              "torch": torch.__version__, "threads": torch.get_num_threads(), "train_scenes": len(scenes),
                              "held_out_scenes": [s.prompt for s in held_out_scenes()],
                              "size": SIZE, "frames": FRAMES}

    record.update(train_vae(vae, scenes, steps=settings.vae_steps, batch_size=settings.vae_batch, lr=settings.vae_lr,
                            kl_weight=settings.vae_kl_weight, object_weight=settings.vae_object_weight,
                            frames=settings.vae_frames, generator=generator, device=device, log=log,
                            max_seconds=minutes(settings.max_minutes_vae)))
    mean, std = latent_statistics(vae, scenes, n=settings.stats_clips, batch_size=256, generator=generator,
                                  device=device)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    vae.save_pretrained(out / "vae")  # early, so the VAE can be checked while the DiT trains; rewritten at the end
    log(f"latent std per channel: {[round(s, 3) for s in std]}")

    latents, labels = encode_latents(vae, scenes, n=settings.latent_clips, batch_size=256, generator=generator,
                                     device=device, mean=mean, std=std)
    log(f"encoded {len(latents)} clips to latents {tuple(latents.shape[1:])}")
    transformer, text_encoder = parts["transformer"].to(device), parts["text_encoder"].to(device)
    record.update(train_dit(transformer, text_encoder, parts["tokenizer"], latents, labels, scenes,
                            steps=settings.dit_steps, batch_size=settings.dit_batch, lr=settings.dit_lr,
                            text_lr=settings.text_lr, drop_prob=settings.drop_prob, shift=settings.shift,
                            ema_decay=settings.ema_decay, generator=generator, device=device, log=log,
                            max_seconds=minutes(settings.max_minutes_dit)))

    stored = getattr(torch, settings.save_dtype)  # half the bytes; loaders cast back to the dtype they run in
    pipe = WanPipeline(tokenizer=parts["tokenizer"], text_encoder=text_encoder.to("cpu", stored),
                       transformer=transformer.to("cpu", stored), vae=vae.to("cpu", stored), scheduler=parts["scheduler"])
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    # how the model is meant to be sampled: every ditserve interface reads its defaults from here
    (out / REQUEST_DEFAULTS_FILE).write_text(json.dumps(asdict(GENERATION), indent=2) + "\n", encoding="utf-8")
    record["total_seconds"] = time.perf_counter() - began
    record["folder_bytes"] = _folder_size(out)
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    log(f"wrote {out} ({record['folder_bytes'] / 1e6:.1f} MB) in {record['total_seconds']:.0f}s")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `python tools/train_tiny.py --out DIR [--seed 0] [--device cuda] [--threads N] [--quick] [--<setting> V]`."""
    parser = argparse.ArgumentParser(
        prog="train_tiny", description="Train the tiny Wan2.1 model (ditserve.tiny) from a seed and write it as a "
        "diffusers-format pipeline folder. Every TrainSettings field is an option (defaults: the shipped recipe).")
    parser.add_argument("--out", required=True, help="folder to write the pipeline into (absent or empty)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage: a smoke test, not a model")
    for f in fields(TrainSettings):
        kind = float if f.name.startswith("max_minutes") else type(f.default)
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                            help=f"default: {'no limit' if f.default is None else f.default}"
                            + (" (stop that stage early; the steps run are recorded)" if kind is float and f.default is None else ""))
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = dict(QUICK) if args.quick else {}
    overrides.update({f.name: getattr(args, f.name) for f in fields(TrainSettings) if getattr(args, f.name) is not None})
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    train_tiny_model(args.out, TrainSettings(**overrides), device=args.device)
    return 0

