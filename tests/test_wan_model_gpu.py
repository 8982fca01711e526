"""Our Wan DiT on the GPU in bf16: the packed path (varlen / FA4 / auto) equals each sample alone."""

from __future__ import annotations

import math

import pytest
import torch

from ditserve.models import WanTransformer3DModel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SMALL = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
    text_dim=256, freq_dim=256, ffn_dim=512, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
)


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    mse = (out.float() - ref.float()).pow(2).mean().item()
    peak = ref.float().abs().max().item()
    return float("inf") if mse == 0 else 10 * math.log10(peak**2 / mse)


@pytest.mark.parametrize("backend", ["auto", "varlen", "fa4"])
def test_packed_bf16_matches_each_sample_alone(backend):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanTransformer3DModel(**SMALL, attention_backend="sdpa").to(torch.bfloat16).eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(5, 30, 52), (1, 64, 64), (3, 16, 24)]
    latents = [torch.randn(16, *s, device="cuda", dtype=torch.bfloat16, generator=g) for s in shapes]
    texts = [torch.randn(n, 256, device="cuda", dtype=torch.bfloat16, generator=g) for n in (77, 512, 20)]
    steps = torch.tensor([999.0, 500.0, 3.0], device="cuda")
    with torch.inference_mode():
        alone = [model(lat[None], steps[i : i + 1], txt[None])[0][0] for i, (lat, txt) in enumerate(zip(latents, texts))]
        try:
            model.set_attention_backend(backend)
            packed = model.forward_packed(latents, steps, texts)
        except Exception as err:  # noqa: BLE001
            if backend == "fa4" and "not installed" in str(err):
                pytest.skip(str(err))
            raise
    for out, ref in zip(packed, alone):
        assert out.shape == ref.shape
        assert psnr(out, ref) >= 40.0
