"""Write a real-size FLUX.1-dev pipeline folder with random weights, in diffusers' format.

For GPU runs that need a folder on disk (`ditserve serve` for bench/serving_http.py, `ditserve
ab`): the published FLUX.1-dev transformer config (bf16, about 24 GB), the FLUX VAE config
(16 latent channels), a small random T5 encoder whose width (4096) matches the DiT's
joint_attention_dim, the tiny CLIP text encoder and offline tokenizers of
tests/helpers/checkpoints.py (CLIP widened to the pooled width 768), and FLUX.1-dev's scheduler.

    python bench/build_flux_folder.py /tmp/flux-dev [--device cuda]
    python bench/build_flux_folder.py /tmp/flux-tiny --tiny      # a CPU smoke build
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent / "tests"))  # tests/helpers: the tiny builders
from flux import FLUX_DEV  # noqa: E402  (bench/flux.py)

SMALL_T5 = dict(d_model=4096, d_kv=64, num_heads=64, d_ff=1024, num_layers=2, relative_attention_num_buckets=32,
                relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                is_encoder_decoder=False, use_cache=False)
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False)


def build_folder(path: Path, device: torch.device, seed: int = 0) -> Path:
    """Build and save the pipeline; refuses a non-empty `path`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from helpers.checkpoints import build_tiny_clip_text_config, build_tiny_clip_tokenizer, build_tiny_t5_tokenizer

    if path.exists() and any(path.iterdir()):
        raise SystemExit(f"{path}: exists and is not empty")
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tiny_clip_tokenizer(), build_tiny_t5_tokenizer()
    clip_config = {**build_tiny_clip_text_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id),
                   "hidden_size": 768, "projection_dim": 768, "intermediate_size": 1536, "num_attention_heads": 12}
    with torch.device(device):
        transformer = FluxTransformer2DModel(**FLUX_DEV).to(torch.bfloat16)
        text_encoder = CLIPTextModel(CLIPTextConfig(**clip_config)).to(torch.bfloat16)
        text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), **SMALL_T5)).to(torch.bfloat16)
        vae = AutoencoderKL(**FLUX_VAE)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="the test suite's tiny FLUX.1-dev instead (CPU smoke)")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.tiny:
        from helpers.checkpoints import build_tiny_flux_pipeline

        build_tiny_flux_pipeline(args.path, seed=args.seed)
    else:
        build_folder(args.path, torch.device(args.device), args.seed)
    print(f"wrote {args.path} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
