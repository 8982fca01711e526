"""Sequence parallelism in the Flux DiT, with real processes (gloo on CPU): 2 and 4 ranks against one process.

Each rank builds the same random model and inputs, enables sequence parallelism over the whole
group and runs a dense forward (one sample, image tokens not divisible by the ranks) and a packed
forward (three samples of different image sizes and text lengths; one has fewer image tokens than
there are ranks, so some ranks hold only padding of it). Image tokens are split, text tokens
stay whole; every rank must return the single-process output (float32 rounding) and the same
output as every other rank. One spawn per world size runs every case and saves what each rank
got; the tests judge those results.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from ditserve.engine.errors import StepInterrupted
from ditserve.models.flux import FluxSample, FluxTransformer2DModel
from helpers.distributed import run_ranks

TOL = 1e-5
SPAWN_TIMEOUT_S = 120
# the tiny test config (tests/helpers/checkpoints.py) with 4 heads, so that 4 ranks each get one
CONFIG: dict[str, Any] = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                              num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=16,
                              guidance_embeds=True, axes_dims_rope=(4, 6, 6))
BLOCKS = CONFIG["num_layers"] + CONFIG["num_single_layers"]
DENSE = (5, 3, 6)  # image height x width in packed latents (15 tokens), text tokens
PACKED = [(4, 5, 7), (3, 3, 4), (1, 3, 5)]  # 20, 9 and 3 image tokens; 3 < 4 ranks
STOP_AT = 3  # the interrupt says stop when asked before this block


def build_model(heads: int = CONFIG["num_attention_heads"]) -> FluxTransformer2DModel:
    """The same random model in every process: every weight drawn from a seeded generator, large
    enough that the gates and norms matter (default init leaves the blocks nearly inert)."""
    model = FluxTransformer2DModel(**dict(CONFIG, num_attention_heads=heads), attention_backend="reference")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.3 * noise)
    return model.eval()


def make_sample(height: int, width: int, text_len: int, seed: int) -> FluxSample:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(height, width, 3)
    ids[..., 1], ids[..., 2] = torch.arange(height)[:, None], torch.arange(width)[None, :]
    return FluxSample(
        latents=torch.randn(height * width, CONFIG["in_channels"], generator=g),
        text=torch.randn(text_len, CONFIG["joint_attention_dim"], generator=g),
        pooled=torch.randn(CONFIG["pooled_projection_dim"], generator=g),
        timestep=torch.tensor(0.3 + 0.2 * seed),
        img_ids=ids.reshape(-1, 3),
        txt_ids=torch.randn(text_len, 3, generator=g).round(),  # not all zero: text rotary must stay whole too
        guidance=torch.tensor(3.5 + seed),
    )


def run_cases(model: FluxTransformer2DModel) -> dict[str, Any]:
    """Every forward the test judges, as one process or one rank runs them."""
    s = make_sample(*DENSE, seed=0)
    with torch.no_grad():
        (dense,) = model(s.latents[None], s.text[None], s.pooled[None], s.timestep[None], s.img_ids, s.txt_ids,
                         s.guidance[None])
        samples = [make_sample(*shape, seed=i + 1) for i, shape in enumerate(PACKED)]
        packed = model.forward_packed(samples)
        asked: list[int] = []

        def interrupt(stop: bool) -> bool:
            asked.append(1)
            return stop and len(asked) == STOP_AT

        model.forward_packed(samples, interrupt=lambda: interrupt(False))
        never = len(asked)
        asked.clear()
        try:
            model.forward_packed(samples, interrupt=lambda: interrupt(True))
            stopped = None
        except StepInterrupted as e:
            stopped = e.block
    return dict(dense=dense, packed=packed, asked=(never, len(asked)), stopped=stopped)


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                         timeout=timedelta(seconds=60))
    try:
        model = build_model()
        model.enable_sequence_parallel(None)
        seen: list[tuple[int, int]] = []  # (image, text) tokens reaching the first block, per forward
        model.transformer_blocks[0].register_forward_pre_hook(lambda _, args: seen.append(
            (args[0].shape[1], args[1].shape[1])))
        results = run_cases(model)
        results["seen"] = seen
        try:  # 2 heads cannot be shared by 4 ranks: refused before any forward
            build_model(heads=2).enable_sequence_parallel(None)
            results["refused"] = None
        except ValueError as e:
            results["refused"] = str(e)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _spawn(world: int, tmp: Path) -> list[dict[str, Any]]:
    tmp.mkdir(parents=True)
    run_ranks(_worker, world, (world, str(tmp / "store"), str(tmp)), SPAWN_TIMEOUT_S)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


@pytest.fixture(scope="module")
def alone() -> dict[str, Any]:
    """What one process (no sequence parallelism) computes."""
    return run_cases(build_model())


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_matches_one_process(world: int, alone: dict[str, Any], tmp_path: Path) -> None:
    per_rank = _spawn(world, tmp_path / f"world{world}")
    assert alone["stopped"] == STOP_AT and alone["asked"] == (BLOCKS - 1, STOP_AT)  # between blocks only
    for rank, got in enumerate(per_rank):
        assert got["dense"].shape == alone["dense"].shape
        assert rel_err(got["dense"], alone["dense"]) <= TOL, f"rank {rank}: dense"
        assert [p.shape for p in got["packed"]] == [p.shape for p in alone["packed"]]
        for i, (out, ref) in enumerate(zip(got["packed"], alone["packed"])):
            assert rel_err(out, ref) <= TOL, f"rank {rank}: packed sample {i}"
        # this rank's padded slice of the image tokens, all of the text (dense, then the packed forwards)
        (h, w, text), chunks = DENSE, [-(-h * w // world) for h, w, _ in PACKED]
        assert got["seen"][:2] == [(-(-h * w // world), text), (sum(chunks), sum(t for *_, t in PACKED))]
        # every rank returns the same whole output, bit for bit
        assert torch.equal(got["dense"], per_rank[0]["dense"])
        assert all(torch.equal(a, b) for a, b in zip(got["packed"], per_rank[0]["packed"]))
        # the interrupt is asked between blocks on every rank, and stops every rank at the same block
        assert (got["asked"], got["stopped"]) == (alone["asked"], alone["stopped"])
        if world == 4:
            assert "divisible by the Ulysses degree (4)" in got["refused"] and "[1, 2]" in got["refused"]
        else:
            assert got["refused"] is None


def test_enable_needs_torch_distributed() -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        build_model().enable_sequence_parallel()
