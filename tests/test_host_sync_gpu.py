"""A packed denoising step never makes the host wait for the GPU.

A sync inside a step drains the stream's queue, and the GPU then idles while the host launches the
next step's first kernels: in a server that steps packed batches back to back, that is lost at every
step. `torch.cuda.set_sync_debug_mode("error")` turns every synchronizing call into an error, so these
run a packed forward (and one whole engine step) under it after a warm-up (attention trials, lazy
initialisation), on small models of each family that packs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import ditserve
from ditserve.engine.step import advance
from ditserve.models import WanTransformer3DModel
from ditserve.models.cosmos3 import Cosmos3OmniTransformer, Cosmos3Sample, vision_position_ids
from ditserve.models.flux import FluxSample, FluxTransformer2DModel

from helpers.checkpoints import build_tiny_flux_pipeline, build_tiny_flux_transformer
from helpers.cosmos3_checkpoints import build_tiny_cosmos3_transformer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

WAN = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
    text_dim=256, freq_dim=256, ffn_dim=512, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
)


@contextmanager
def syncs_are_errors() -> Iterator[None]:
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_detector_catches_a_pageable_copy() -> None:
    """What the tests below rely on: a plain host-to-device copy is reported here."""
    with syncs_are_errors(), pytest.raises(RuntimeError, match="synchroniz"):
        torch.tensor([0, 1, 2]).to("cuda")


def flux_samples(model: FluxTransformer2DModel, sides: list[tuple[int, int]]) -> list[FluxSample]:
    cfg = model.config
    g = torch.Generator("cuda").manual_seed(0)
    samples = []
    for h, w in sides:
        ids = torch.zeros(h, w, 3, device="cuda")
        ids[..., 1] = torch.arange(h, device="cuda")[:, None]
        ids[..., 2] = torch.arange(w, device="cuda")[None, :]
        samples.append(FluxSample(
            latents=torch.randn(h * w, cfg.in_channels, device="cuda", dtype=torch.bfloat16, generator=g),
            text=torch.randn(7, cfg.joint_attention_dim, device="cuda", dtype=torch.bfloat16, generator=g),
            pooled=torch.randn(cfg.pooled_projection_dim, device="cuda", dtype=torch.bfloat16, generator=g),
            timestep=torch.tensor(0.5, device="cuda"), img_ids=ids.reshape(-1, 3),
            txt_ids=torch.zeros(7, 3, device="cuda"), guidance=torch.tensor(3.5, device="cuda"),
        ))
    return samples


def test_flux_packed_forward_never_syncs() -> None:
    ref = build_tiny_flux_transformer(0, guidance_embeds=True)
    model = FluxTransformer2DModel.from_config(dict(ref.config)).to("cuda", torch.bfloat16).eval()
    samples = flux_samples(model, [(4, 6), (8, 8), (2, 3)])
    with torch.inference_mode():
        model.forward_packed(samples)  # warm-up: `auto` times its candidates (which syncs) once per shape
        with syncs_are_errors():
            out = model.forward_packed(samples)
    assert [tuple(o.shape) for o in out] == [(24, model.config.in_channels), (64, model.config.in_channels),
                                             (6, model.config.in_channels)]


def test_wan_packed_forward_never_syncs() -> None:
    with torch.device("cuda"):
        model = WanTransformer3DModel(**WAN).to(torch.bfloat16).eval()
    g = torch.Generator("cuda").manual_seed(0)
    latents = [torch.randn(16, *s, device="cuda", dtype=torch.bfloat16, generator=g) for s in [(3, 8, 12), (1, 16, 16)]]
    texts = [torch.randn(n, 256, device="cuda", dtype=torch.bfloat16, generator=g) for n in (20, 9)]
    steps = torch.tensor([999.0, 3.0], device="cuda")
    with torch.inference_mode():
        model.forward_packed(latents, steps, texts)
        with syncs_are_errors():
            out = model.forward_packed(latents, steps, texts)
    assert [tuple(o.shape) for o in out] == [(16, 3, 8, 12), (16, 1, 16, 16)]


def test_cosmos3_packed_forward_never_syncs() -> None:
    ref = build_tiny_cosmos3_transformer(300, seed=0, backbone="nano")
    model = Cosmos3OmniTransformer.from_config(dict(ref.config)).to("cuda", torch.bfloat16).eval()
    g = torch.Generator("cuda").manual_seed(0)
    with torch.inference_mode():
        texts = model.encode_text([torch.randint(0, 300, (n,), device="cuda", generator=g) for n in (7, 11)])
        samples = [Cosmos3Sample(torch.randn(48, *grid, device="cuda", generator=g), torch.tensor(500.0, device="cuda"),
                                 text, vision_position_ids(tuple(-(-d // 2) if i else d for i, d in enumerate(grid)),
                                                           text.length, 24.0, model.config, 4).to("cuda"))
                   for grid, text in zip([(2, 3, 5), (1, 4, 4)], texts)]
        model.forward_packed(samples)
        with syncs_are_errors():
            out = model.forward_packed(samples)
    assert [tuple(o.shape) for o in out] == [(48, 2, 3, 5), (48, 1, 4, 4)]


def test_a_flux_engine_step_of_two_sizes_never_syncs(tmp_path: Path) -> None:
    """The whole step the batching engine runs: the packed forward and each request's scheduler step."""
    pipe = ditserve.Pipeline.from_pretrained(build_tiny_flux_pipeline(tmp_path / "flux", seed=0), device="cuda")
    requests = [pipe.validate("a red ball", height=32, width=48, num_inference_steps=3, seed=1),
                pipe.validate("a blue cube", height=64, width=32, num_inference_steps=3, seed=2)]
    prepared = pipe.prepare_batch(requests)
    latents = advance(pipe, [(p, p.latents, 0) for p in prepared])
    with syncs_are_errors():
        latents = advance(pipe, [(p, lat, 1) for p, lat in zip(prepared, latents)])
    assert [tuple(lat.shape) for lat in latents] == [tuple(p.latents.shape) for p in prepared]
