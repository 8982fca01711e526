"""Wan2.2 in our Wan DiT: per-token timesteps (TI2V-5B) against diffusers, and the tiny Wan2.2
folders (T2V-A14B, TI2V-5B) loaded and run by diffusers' own pipelines (CPU, float32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from helpers.checkpoints import (  # noqa: E402
    build_tiny_wan22_a14b_pipeline,
    build_tiny_wan22_ti2v_pipeline,
    build_tiny_wan22_transformer_config,
)

from ditserve.loading import load_component  # noqa: E402
from ditserve.models import WanTransformer3DModel  # noqa: E402

CONFIG = build_tiny_wan22_transformer_config()  # 48 channels in and out, patch (1, 2, 2)
TOL = 1e-5


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.fixture(scope="module")
def ref_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**CONFIG).eval()
    with torch.no_grad():  # every parameter random, including the ones diffusers zero/one-inits
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name and name.endswith("weight")
                    else 0.3 * torch.randn_like(p))
    return model


def _ours(ref_model: torch.nn.Module, backend: str = "reference") -> WanTransformer3DModel:
    model = WanTransformer3DModel.from_config(dict(ref_model.config), attention_backend=backend).eval()
    model.load_state_dict(ref_model.state_dict(), strict=True)
    return model


@pytest.fixture(scope="module")
def ours(ref_model) -> WanTransformer3DModel:
    return _ours(ref_model)


def latent(frames: int, height: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(CONFIG["in_channels"], frames, height, width, generator=torch.Generator().manual_seed(seed))


def text(length: int, seed: int) -> torch.Tensor:
    return torch.randn(length, CONFIG["text_dim"], generator=torch.Generator().manual_seed(seed))


def first_frame_at_zero(t: float, frames: int, height: int, width: int) -> torch.Tensor:
    """TI2V image-to-video timesteps `[S]`: the first latent frame's tokens at 0, the others at t."""
    per_frame = (height // 2) * (width // 2)
    ts = torch.full((frames * per_frame,), float(t))
    ts[:per_frame] = 0.0
    return ts


class Recorder:
    """What the time MLP embeds (rows) and which per-token row index the blocks get."""

    def __init__(self, model: WanTransformer3DModel) -> None:
        self.time_rows: list[int] = []
        self.block_rows: list[torch.Tensor | None] = []
        self.handles = [
            model.condition_embedder.time_embedder.register_forward_pre_hook(
                lambda m, args: self.time_rows.append(args[0].shape[0])),
            model.blocks[0].register_forward_pre_hook(lambda m, args: self.block_rows.append(args[4])),
        ]

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@torch.no_grad()
def test_per_token_timesteps_match_diffusers(ref_model, ours, backend):
    ours.set_attention_backend(backend)
    x = torch.stack([latent(3, 4, 6, seed=1), latent(3, 4, 6, seed=2)])
    context = torch.stack([text(7, seed=3), text(7, seed=4)])
    tokens = 3 * 2 * 3
    cases = {
        "first frame at 0": torch.stack([first_frame_at_zero(900.0, 3, 4, 6), first_frame_at_zero(37.5, 3, 4, 6)]),
        "all equal": torch.full((2, tokens), 500.0),
        "one per sample": torch.tensor([[900.0], [37.5]]).expand(2, tokens),
    }
    for name, timestep in cases.items():
        (ref,) = ref_model(x, timestep, context, return_dict=False)
        (out,) = ours(x, timestep, context, return_dict=False)
        assert out.shape == ref.shape
        assert rel_err(out, ref) <= TOL, name
    # all equal is the one-timestep-per-sample layout
    (same,) = ours(x, torch.tensor([500.0, 500.0]), context)
    assert rel_err(ours(x, cases["all equal"], context)[0], same) <= 1e-6


@torch.no_grad()
def test_per_token_timesteps_embed_a_table_not_every_token(ours):
    """The time MLP sees the distinct timesteps only; no per-token gather unless tokens differ."""
    ours.set_attention_backend("reference")
    x, context = latent(3, 4, 6, seed=5)[None].expand(2, -1, -1, -1, -1), text(5, seed=6)[None].expand(2, -1, -1)
    ti2v = torch.stack([first_frame_at_zero(900.0, 3, 4, 6), first_frame_at_zero(37.5, 3, 4, 6)])
    with Recorder(ours) as seen:
        ours(x, ti2v, context)
        ours(x, torch.full((2, 18), 500.0), context)
        ours(x, torch.tensor([900.0, 37.5]), context)
    assert seen.time_rows == [3, 1, 2]  # {0, 37.5, 900}; {500}; one per sample
    rows = seen.block_rows[0]
    assert rows is not None and rows.shape == (2, 18)
    assert seen.block_rows[1:] == [None, None]  # the dense fast path: no index, no gather


@pytest.mark.parametrize("backend", ["reference", "auto"])
@torch.no_grad()
def test_packed_mixes_per_token_and_one_timestep_samples(ref_model, ours, backend):
    ours.set_attention_backend(backend)
    a, b = latent(3, 4, 6, seed=7), latent(2, 6, 4, seed=8)
    text_a, text_b = text(5, seed=9), text(8, seed=10)
    t_a = first_frame_at_zero(700.0, 3, 4, 6)
    with Recorder(ours) as seen:
        packed = ours.forward_packed([a, b], [t_a, torch.tensor(250.0)], [text_a, text_b])
        floats = ours.forward_packed([b, a], [250.0, t_a], [text_b, text_a])  # a plain number, either order
    assert seen.time_rows == [3, 3]  # {0, 250, 700}
    (ref_a,) = ref_model(a[None], t_a[None], text_a[None], return_dict=False)
    (ref_b,) = ref_model(b[None], torch.tensor([250.0]), text_b[None], return_dict=False)
    alone_a = ours.forward_packed([a], [t_a], [text_a])[0]  # one sample: the dense layout
    assert rel_err(alone_a, ref_a[0]) <= TOL
    for got_a, got_b in ((packed[0], packed[1]), (floats[1], floats[0])):
        assert got_a.shape == a.shape and got_b.shape == b.shape
        assert rel_err(got_a, ref_a[0]) <= TOL and rel_err(got_a, alone_a) <= TOL
        assert rel_err(got_b, ref_b[0]) <= TOL


@torch.no_grad()
def test_packed_same_shape_mix_runs_dense(ref_model, ours):
    """Same shapes and text lengths: the stacked dense forward, with `[N, S]` timesteps."""
    ours.set_attention_backend("reference")
    a, b, context = latent(2, 4, 4, seed=11), latent(2, 4, 4, seed=12), text(6, seed=13)
    t_a = first_frame_at_zero(400.0, 2, 4, 4)
    out = ours.forward_packed([a, b], [t_a, 60.0], [context, context])
    (ref,) = ref_model(torch.stack([a, b]), torch.stack([t_a, torch.full_like(t_a, 60.0)]),
                       context[None].expand(2, -1, -1), return_dict=False)
    assert rel_err(torch.stack(out), ref) <= TOL
    stacked = ours.forward_packed([a, b], torch.stack([t_a, torch.full_like(t_a, 60.0)]), [context, context])
    assert rel_err(torch.stack(stacked), ref) <= TOL  # an [N, S] tensor works too


@torch.no_grad()
def test_bad_per_token_timesteps_raise_clearly(ours):
    x, context = latent(2, 4, 4, seed=14), text(3, seed=15)
    with pytest.raises(ValueError, match=r"\[B=1, S=8\]"):
        ours(x[None], torch.zeros(1, 7), context[None])
    with pytest.raises(ValueError, match="scalar, \\[B\\] or \\[B, S\\]"):
        ours(x[None], torch.zeros(1, 8, 1), context[None])
    with pytest.raises(ValueError, match=r"timesteps\[1\] must be one value or one per patch token \(\[4\]\)"):
        ours.forward_packed([x, x[:, :1]], [1.0, torch.zeros(5)], [context, context])
    with pytest.raises(ValueError, match="one timestep per sample"):
        ours.forward_packed([x, x[:, :1]], [torch.zeros(8)], [context, context])


def test_compiled_blocks_trace_per_token_timesteps(ref_model):
    """torch.compile (aot_eager) of the blocks, with the fused q/k/v and the q/k norm + rotary op,
    on a packed batch mixing per-token and one-per-sample timesteps (the per-token gather):
    the same result as eager."""
    torch._dynamo.reset()
    model = _ours(ref_model)
    model.fuse_qkv_projections()
    a, b, text_a, text_b = latent(2, 4, 6, seed=16), latent(1, 2, 4, seed=17), text(5, seed=18), text(3, seed=19)
    args = ([a, b], [first_frame_at_zero(600.0, 2, 4, 6), 20.0], [text_a, text_b])
    with torch.no_grad():
        eager = model.forward_packed(*args)
        model.compile_blocks(backend="aot_eager", fullgraph=False)
        for got, ref in zip(model.forward_packed(*args), eager):
            assert rel_err(got, ref) <= 1e-6
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- tiny Wan2.2 folders


def _load_ours(root: Path, name: str) -> WanTransformer3DModel:
    return load_component(root, name, lambda c: WanTransformer3DModel.from_config(c, attention_backend="reference"),
                          device="cpu", dtype=torch.float32)


def _record_calls(model: torch.nn.Module) -> list[tuple[dict, torch.Tensor]]:
    """(inputs, output) of every call of a diffusers transformer inside a pipeline."""
    calls: list[tuple[dict, torch.Tensor]] = []
    model.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(({k: v for k, v in kwargs.items() if torch.is_tensor(v)}, out[0])),
        with_kwargs=True)
    return calls


def _ours_on(model: WanTransformer3DModel, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"])[0]


def test_tiny_a14b_folder_runs_in_diffusers_and_loads_in_ours(tmp_path):
    root = build_tiny_wan22_a14b_pipeline(tmp_path / "a14b", seed=0)
    index = json.loads((root / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.875 and index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    pipe = diffusers.WanPipeline.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    high, low = _record_calls(pipe.transformer), _record_calls(pipe.transformer_2)
    # 3 steps: with flow_shift 12 the third timestep (~857) is the first below the boundary (875)
    frames = pipe(prompt="a red circle", negative_prompt="blurry", height=32, width=32, num_frames=5,
                  num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                  output_type="np").frames
    assert frames.shape == (1, 5, 32, 32, 3) and torch.isfinite(torch.as_tensor(frames)).all()
    assert len(high) == 4 and len(low) == 2  # CFG: two calls per step
    ours_high, ours_low = _load_ours(root, "transformer"), _load_ours(root, "transformer_2")
    for model, calls in ((ours_high, high), (ours_low, low)):
        for inputs, expected in calls:
            assert rel_err(_ours_on(model, inputs), expected) <= TOL
    inputs = high[0][0]  # two experts, two sets of weights
    assert rel_err(_ours_on(ours_high, inputs), _ours_on(ours_low, inputs)) > 1e-2


def test_tiny_ti2v_folder_runs_in_diffusers_and_matches_ours(tmp_path):
    """Text-to-video (all tokens at t) and image-to-video (first frame at 0) on the TI2V folder:
    our DiT on the exact inputs diffusers' pipelines give theirs."""
    from PIL import Image

    root = build_tiny_wan22_ti2v_pipeline(tmp_path / "ti2v", seed=0)
    assert json.loads((root / "model_index.json").read_text())["expand_timesteps"] is True
    pipe = diffusers.WanPipeline.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.z_dim == 48 and pipe.vae_scale_factor_spatial == 16
    assert pipe.transformer.config.in_channels == 48
    calls = _record_calls(pipe.transformer)
    frames = pipe(prompt="a red circle", negative_prompt="blurry", height=32, width=64, num_frames=9,
                  num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                  output_type="np").frames
    assert frames.shape == (1, 9, 32, 64, 3)
    assert len(calls) == 4 and calls[0][0]["timestep"].shape == (1, 3 * 1 * 2)  # [B, S]: per token

    # image-to-video: diffusers' I2V pipeline on the same components (prompt embeds given: its
    # prompt cleaning needs ftfy)
    i2v = diffusers.WanImageToVideoPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                            scheduler=pipe.scheduler, transformer=pipe.transformer,
                                            expand_timesteps=True)
    i2v.set_progress_bar_config(disable=True)
    prompt_embeds, _ = pipe.encode_prompt("a red circle", do_classifier_free_guidance=False)
    image = Image.fromarray((torch.rand(32, 64, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy())
    i2v(image=image, prompt_embeds=prompt_embeds, height=32, width=64, num_frames=9, num_inference_steps=2,
        guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="np")
    i2v_timestep = calls[4][0]["timestep"]
    assert len(calls) == 6 and i2v_timestep[0, :2].eq(0).all() and i2v_timestep[0, 2:].gt(0).all()

    ours = _load_ours(root, "transformer")
    for inputs, expected in calls:
        assert rel_err(_ours_on(ours, inputs), expected) <= TOL
