"""Write a real-size Wan2.1-T2V-1.3B pipeline folder with random weights, in diffusers' format.

For GPU runs that need a folder on disk (`ditserve ab`, `ditserve serve`): the published
1.3B transformer config and the Wan2.1 VAE (diffusers' default `AutoencoderKLWan` config)
with random weights, a small random UMT5 encoder whose width (4096) matches the DiT's
text_dim (the real UMT5-XXL would add 11 GB of writing for no timing the DiT cares about), the
small offline tokenizer of `tests/helpers/checkpoints.py`, and Wan2.1's UniPC flow scheduler (shift 3).

    python bench/build_wan_folder.py /tmp/wan13 [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent / "tests"))  # tests/helpers: the tiny checkpoint builders
from wan import COMMON, WAN_CONFIGS  # noqa: E402  (bench/wan.py)

SMALL_UMT5 = dict(d_model=4096, d_kv=64, num_heads=64, d_ff=1024, num_layers=2,
                  relative_attention_num_buckets=32, relative_attention_max_distance=128,
                  feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)


def build_folder(path: Path, device: torch.device, seed: int = 0) -> Path:
    """Build and save the pipeline; refuses a non-empty `path`."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from helpers.checkpoints import build_tiny_t5_tokenizer

    if path.exists() and any(path.iterdir()):
        raise SystemExit(f"{path}: exists and is not empty")
    torch.manual_seed(seed)
    tokenizer = build_tiny_t5_tokenizer()
    with torch.device(device):
        transformer = WanTransformer3DModel(**COMMON, **WAN_CONFIGS["1.3b"]).to(torch.bfloat16)
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **SMALL_UMT5)).to(torch.bfloat16)
        vae = AutoencoderKLWan()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=scheduler)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    build_folder(args.path, torch.device(args.device), args.seed)
    print(f"wrote {args.path} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
