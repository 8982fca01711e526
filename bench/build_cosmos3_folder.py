"""Write a real-size Cosmos3 pipeline folder with random weights, in diffusers' format.

For whole-generation GPU runs that need a folder on disk (`ditserve generate` / `ditserve ab` /
`ditserve serve` at 1280x720x189): diffusers' default `Cosmos3OmniTransformer` config (Nano-sized,
bf16, about 30 GB), the Wan2.2 VAE at its published config (bench/wan_pipeline.py's WAN22_VAE),
the small offline Qwen-style tokenizer of tests/helpers/cosmos3_checkpoints.py (its ids are a
subset of the 151,936-entry vocabulary) and a UniPC flow scheduler (shift 10; the published
checkpoint's own scheduler/ may be dropped in: the timing does not depend on it). Saved with
diffusers' own `Cosmos3OmniPipeline.save_pretrained`, no safety checker.

    python bench/build_cosmos3_folder.py /tmp/cosmos3-nano [--device cuda]
    python bench/build_cosmos3_folder.py /tmp/cosmos3-tiny --tiny      # a CPU smoke build
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent / "tests"))  # tests/helpers: the tiny builders
from cosmos3 import TINY
from wan_pipeline import WAN22_VAE

TINY_VAE = {**WAN22_VAE, "base_dim": 16, "decoder_base_dim": 16, "num_res_blocks": 1}


def build_folder(path: Path, device: torch.device, seed: int = 0, *, tiny: bool = False) -> Path:
    """Build and save the pipeline; refuses a non-empty `path`. tiny: bench/cosmos3.py's tiny transformer
    and a narrow Wan2.2 VAE (same compression), for a CPU smoke build."""
    from diffusers import (
        AutoencoderKLWan,
        Cosmos3OmniPipeline,
        Cosmos3OmniTransformer,
        UniPCMultistepScheduler,
    )
    from helpers.cosmos3_checkpoints import build_tiny_cosmos3_tokenizer

    if path.exists() and any(path.iterdir()):
        raise SystemExit(f"{path}: exists and is not empty")
    torch.manual_seed(seed)
    tokenizer = build_tiny_cosmos3_tokenizer()
    transformer_config = TINY if tiny else {}
    if transformer_config.get("vocab_size", 151936) < len(tokenizer):
        transformer_config = {**transformer_config, "vocab_size": len(tokenizer)}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no float32 copy of 15B weights
    try:
        with torch.device(device):
            transformer = Cosmos3OmniTransformer(**transformer_config).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.device(device):
        vae = AutoencoderKLWan(**(TINY_VAE if tiny else WAN22_VAE)).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=10.0)
    pipe = Cosmos3OmniPipeline(transformer=transformer, text_tokenizer=tokenizer, vae=vae, scheduler=scheduler,
                               enable_safety_checker=False)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny transformer and VAE (CPU smoke build)")
    args = parser.parse_args()
    start = time.perf_counter()
    build_folder(args.path, torch.device(args.device), args.seed, tiny=args.tiny)
    print(f"wrote {args.path} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
