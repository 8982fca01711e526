"""Sizes of the tiny model's components (how it is sampled: `ditserve.tiny.GENERATION`).

All components are the published Wan2.1 classes at small sizes, so the trained folder is
an ordinary diffusers-format Wan2.1 text-to-video checkpoint: 8x spatial / 4x temporal VAE
compression, 16 latent channels, (1, 2, 2) patches, UniPC flow-matching scheduler.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "FLOW_SHIFT",
    "scheduler_config",
    "text_encoder_config",
    "transformer_config",
    "vae_config",
]

FLOW_SHIFT = 3.0  # Wan2.1's published UniPC flow_shift; training draws sigmas with the same shift
TEXT_DIM = 64


def vae_config(base_dim: int = 16, num_res_blocks: int = 0) -> dict[str, Any]:
    """`AutoencoderKLWan` arguments (latents_mean / latents_std are set from data after training).

    With num_res_blocks=0 every stage keeps `base_dim` channels (diffusers' Wan VAE changes
    width only inside residual blocks); otherwise the widths are Wan2.1's x1, x2, x2, x2. The
    default, 16 wide and shallow, trains as fast per step as deeper variants and runs faster.
    """
    dim_mult = [1, 1, 1, 1] if num_res_blocks == 0 else [1, 2, 2, 2]
    return dict(base_dim=base_dim, z_dim=16, dim_mult=dim_mult, num_res_blocks=num_res_blocks, attn_scales=[],
                temperal_downsample=[False, True, True], dropout=0.0)


def transformer_config() -> dict[str, Any]:
    """`WanTransformer3DModel` arguments: 4 heads x 32 = 128 wide, 6 blocks (head_dim 32 -> rotary t/h/w 12/10/10)."""
    return dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16,
                out_channels=16, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=512, num_layers=6,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def text_encoder_config(vocab_size: int) -> dict[str, Any]:
    """`UMT5Config` arguments; d_model = the transformer's text_dim."""
    return dict(vocab_size=vocab_size, d_model=TEXT_DIM, num_layers=2, num_heads=4, d_kv=16, d_ff=128,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)


def scheduler_config() -> dict[str, Any]:
    """`UniPCMultistepScheduler` arguments: Wan2.1's flow-matching setup."""
    return dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                flow_shift=FLOW_SHIFT)
