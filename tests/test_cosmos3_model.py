"""Our Cosmos3 generation model against diffusers' `Cosmos3OmniTransformer` on tiny random weights
(CPU, float32): dense (diffusers' own call, both towers every step) and packed (the text tower
once per prompt, then vision steps over samples of different sizes, prompts and fps), for the
Qwen3-style ("nano") and Nemotron-style ("edge") backbones.

Inputs are built the way diffusers' pipeline builds them (its mRoPE position helpers), so the
comparison covers the positions and the fps scaling as well as the layers. Tolerance: 1e-5
relative to the largest output value.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import (
    get_3d_mrope_ids_text_tokens,
    get_3d_mrope_ids_vae_tokens,
)
from helpers.cosmos3_checkpoints import build_tiny_cosmos3_transformer

from ditserve.engine.errors import StepInterrupted
from ditserve.models.cosmos3 import (
    Cosmos3OmniTransformer,
    Cosmos3Sample,
    Cosmos3TransformerConfig,
    vision_position_ids,
)

TOL = 1e-5
VOCAB = 300
# (text tokens, latent frames, latent height, latent width, timestep, fps): odd heights and widths
# exercise the patch padding; one image (a single frame: no fps scaling); fps 16 and 24.
CASES = [(7, 2, 3, 5, 500, 24.0), (11, 1, 4, 4, 900, None), (5, 3, 2, 3, 3, 16.0)]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.fixture(scope="module", params=["nano", "edge"])
def models(request: pytest.FixtureRequest) -> tuple[Any, Cosmos3OmniTransformer]:
    ref = build_tiny_cosmos3_transformer(VOCAB, seed=0, backbone=request.param)
    ours = Cosmos3OmniTransformer.from_config(dict(ref.config), attention_backend="reference").eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def diffusers_inputs(text_len: int, frames: int, height: int, width: int, t: int, fps: float | None,
                     seed: int) -> dict[str, Any]:
    """One vision item and its prompt, as Cosmos3OmniPipeline lays them out for the transformer."""
    g = torch.Generator().manual_seed(seed)
    grid = (frames, -(-height // 2), -(-width // 2))
    tokens = math.prod(grid)
    text_ids, offset = get_3d_mrope_ids_text_tokens(text_len, 0, use_float_positions=True)
    vision_ids, _ = get_3d_mrope_ids_vae_tokens(*grid, temporal_offset=offset + 15000, fps=fps, base_fps=24.0,
                                                temporal_compression_factor=4)
    return {
        "input_ids": torch.randint(0, VOCAB, (text_len,), generator=g),
        "text_indexes": torch.arange(text_len),
        "position_ids": torch.cat([text_ids, vision_ids], dim=1),
        "und_len": text_len,
        "sequence_length": text_len + tokens,
        "vision_tokens": [torch.randn(1, 48, frames, height, width, generator=g)],
        "vision_token_shapes": [grid],
        "vision_sequence_indexes": torch.arange(text_len, text_len + tokens),
        "vision_mse_loss_indexes": torch.arange(text_len, text_len + tokens),
        "vision_timesteps": torch.full((tokens,), t),
        "vision_noisy_frame_indexes": [torch.arange(frames)],
        "return_dict": False,
    }


@torch.no_grad()
def test_dense_forward_matches_diffusers(models: tuple[Any, Cosmos3OmniTransformer]) -> None:
    ref, ours = models
    for seed, case in enumerate(CASES):
        inputs = diffusers_inputs(*case, seed=seed)
        (theirs,), _, _ = ref(**inputs)
        (got,), sound, action = ours(**inputs)
        assert got.shape == theirs.shape == inputs["vision_tokens"][0].shape and sound is None and action is None
        assert rel_err(got, theirs) <= TOL


@torch.no_grad()
def test_packed_forward_with_kept_text_matches_diffusers_per_sample(models: tuple[Any, Cosmos3OmniTransformer]) -> None:
    """Three prompts through the text tower in one packed (causal) forward; then one vision step over
    three samples of different sizes, text lengths and fps, each attending to its own prompt only."""
    ref, ours = models
    inputs = [diffusers_inputs(*case, seed=seed) for seed, case in enumerate(CASES)]
    texts = ours.encode_text([i["input_ids"] for i in inputs])
    assert [t.length for t in texts] == [c[0] for c in CASES]
    samples = []
    for i, text, (_, frames, height, width, t, fps) in zip(inputs, texts, CASES):
        positions = vision_position_ids((frames, -(-height // 2), -(-width // 2)), text.length, fps, ours.config, 4)
        assert torch.equal(positions, i["position_ids"][:, i["und_len"]:])  # the pipeline's positions, exactly
        samples.append(Cosmos3Sample(i["vision_tokens"][0][0], torch.tensor(t), text, positions))
    outputs = ours.forward_packed(samples)
    for i, got in zip(inputs, outputs):
        (theirs,), _, _ = ref(**i)
        assert got.shape == theirs.shape[1:] and rel_err(got, theirs[0]) <= TOL
    # samples of one shape and prompt length run dense (stacked), and agree with the packed run
    same = [samples[0], Cosmos3Sample(samples[0].latents * 0.5, torch.tensor(40), texts[0], samples[0].positions)]
    stacked = ours.forward_packed(same)
    assert rel_err(stacked[0], outputs[0]) <= TOL
    (theirs,), _, _ = ref(**{**inputs[0], "vision_tokens": [inputs[0]["vision_tokens"][0] * 0.5],
                             "vision_timesteps": torch.full_like(inputs[0]["vision_timesteps"], 40)})
    assert rel_err(stacked[1], theirs[0]) <= TOL


@torch.no_grad()
def test_each_sample_sees_only_its_own_prompt(models: tuple[Any, Cosmos3OmniTransformer]) -> None:
    """Changing one sample's prompt changes its prediction and no other's."""
    _, ours = models
    inputs = [diffusers_inputs(*case, seed=seed) for seed, case in enumerate(CASES[:2])]
    other = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(9))
    texts = ours.encode_text([inputs[0]["input_ids"], inputs[1]["input_ids"], other])

    def samples(second: Any) -> list[Cosmos3Sample]:
        return [Cosmos3Sample(i["vision_tokens"][0][0], torch.tensor(300), text,
                              vision_position_ids(ours._grid(i["vision_tokens"][0].shape[1:]), text.length, 24.0,
                                                  ours.config, 4))
                for i, text in zip(inputs, [texts[0], second])]

    base, changed = ours.forward_packed(samples(texts[1])), ours.forward_packed(samples(texts[2]))
    assert rel_err(changed[0], base[0]) <= TOL
    assert rel_err(changed[1], base[1]) > 1e-3


def test_grouped_query_heads_and_the_checkpoint_names(models: tuple[Any, Cosmos3OmniTransformer]) -> None:
    ref, ours = models
    attn = ours.layers[0].self_attn
    assert (attn.heads, attn.kv_heads) == (4, 2)
    assert attn.add_k_proj.out_features == attn.add_q_proj.out_features // 2
    assert set(ours.state_dict()) == set(ref.state_dict())  # the action / sound / LM heads load too
    assert Cosmos3TransformerConfig().num_attention_heads == 32 and Cosmos3TransformerConfig().num_key_value_heads == 8


def test_drop_unused_heads_frees_them_and_keeps_the_output() -> None:
    ref = build_tiny_cosmos3_transformer(VOCAB, seed=1)
    ours = Cosmos3OmniTransformer.from_config(dict(ref.config), attention_backend="reference").eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    inputs = diffusers_inputs(*CASES[0], seed=0)
    with torch.no_grad():
        before = ours(**inputs)[0][0]
        ours.drop_unused_heads()
        after = ours(**inputs)[0][0]
    assert not any(k.startswith(("lm_head", "action_", "audio_")) for k in ours.state_dict())
    assert torch.equal(before, after)


def test_interrupt_stops_between_layers(models: tuple[Any, Cosmos3OmniTransformer]) -> None:
    _, ours = models
    inputs = diffusers_inputs(*CASES[0], seed=0)
    with torch.no_grad(), pytest.raises(StepInterrupted, match="before block 2 of 2"):
        ours(**inputs, interrupt=lambda: True)


def test_bad_inputs_and_configs_are_refused() -> None:
    with pytest.raises(ValueError, match=r"num_attention_heads=6 must be a multiple of num_key_value_heads=4"):
        Cosmos3TransformerConfig(num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"hidden_act must be 'silu' \(Qwen3 backbone\) or 'relu2'"):
        Cosmos3TransformerConfig(hidden_act="gelu")
    with pytest.raises(ValueError, match="patch_latent_dim=100 must be latent_patch_size"):
        Cosmos3TransformerConfig(patch_latent_dim=100)
    assert Cosmos3TransformerConfig(rope_scaling={"mrope_section": [8, 4, 4]}).rope_axes_dim == (8, 4, 4)
    ref = build_tiny_cosmos3_transformer(VOCAB, seed=2)
    ours = Cosmos3OmniTransformer.from_config(dict(ref.config))
    inputs = diffusers_inputs(*CASES[0], seed=0)
    with pytest.raises(NotImplementedError, match="conditioning frames"):
        ours(**{**inputs, "vision_noisy_frame_indexes": [torch.tensor([1])]})
    with pytest.raises(NotImplementedError, match=r"text-to-video/image only; got \['sound_tokens'\]"):
        ours(**inputs, sound_tokens=[torch.zeros(8, 4)])
    text = ours.encode_text([inputs["input_ids"]])[0]
    with pytest.raises(ValueError, match=r"samples\[0\].positions must be \[3, 12\]"):
        ours.forward_packed([Cosmos3Sample(inputs["vision_tokens"][0][0], torch.tensor(1), text, torch.zeros(3, 5))])
