"""Our Flux.1 DiT against diffusers' on tiny random checkpoints (CPU, float32), and the tiny
Flux pipeline folder builder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from helpers.checkpoints import (  # noqa: E402
    build_tiny_flux_pipeline,
    build_tiny_flux_transformer,
    build_tiny_flux_transformer_config,
)

from ditserve.engine.errors import StepInterrupted  # noqa: E402
from ditserve.loading import load_component  # noqa: E402
from ditserve.models.flux import FluxSample, FluxTransformer2DModel, TokenLayout  # noqa: E402

TOL = 1e-5
TINY = build_tiny_flux_transformer_config()
IN, TEXT, POOLED = TINY["in_channels"], TINY["joint_attention_dim"], TINY["pooled_projection_dim"]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random and large enough to matter (default init leaves the blocks' gates small)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.3 * noise)
    return model.eval()


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def ref_model(request) -> torch.nn.Module:
    return randomized(build_tiny_flux_transformer(0, guidance_embeds=request.param), seed=1)


def ours_from(ref: torch.nn.Module, backend: str = "reference") -> FluxTransformer2DModel:
    model = FluxTransformer2DModel.from_config(dict(ref.config), attention_backend=backend).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


@pytest.fixture(scope="module")
def ours(ref_model) -> FluxTransformer2DModel:
    return ours_from(ref_model)


def image_ids(height: int, width: int) -> torch.Tensor:
    """FluxPipeline's image position ids: (0, row, column) per packed latent token."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(-1, 3)


def make_sample(height: int, width: int, text_len: int, t: float, guidance: float | None, seed: int) -> FluxSample:
    g = torch.Generator().manual_seed(seed)
    return FluxSample(
        latents=torch.randn(height * width, IN, generator=g),
        text=torch.randn(text_len, TEXT, generator=g),
        pooled=torch.randn(POOLED, generator=g),
        timestep=torch.tensor(t),
        img_ids=image_ids(height, width),
        txt_ids=torch.zeros(text_len, 3),
        guidance=None if guidance is None else torch.tensor(guidance),
    )


def guidance_for(model, value: float) -> float | None:
    return value if model.config.guidance_embeds else None


@torch.no_grad()
def ref_single(ref_model, s: FluxSample) -> torch.Tensor:
    (out,) = ref_model(s.latents[None], s.text[None], s.pooled[None], s.timestep[None], s.img_ids, s.txt_ids,
                       None if s.guidance is None else s.guidance[None], return_dict=False)
    return out[0]


def three_samples(model) -> list[FluxSample]:
    """Different image sizes, text lengths, timesteps and guidance scales."""
    return [
        make_sample(3, 4, 5, 0.9, guidance_for(model, 3.5), seed=2),
        make_sample(2, 2, 7, 0.4, guidance_for(model, 1.0), seed=3),
        make_sample(4, 5, 3, 0.05, guidance_for(model, 7.0), seed=4),
    ]


def test_state_dict_keys_and_shapes_match_diffusers(ref_model, ours):
    ref_shapes = {k: tuple(v.shape) for k, v in ref_model.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert ours.config.guidance_embeds == ref_model.config.guidance_embeds
    assert ours.config.out_channels == IN and ours.config.axes_dims_rope == (4, 6, 6)
    assert ours._keep_in_fp32_modules == ()
    assert ours.dtype == torch.float32 and ours.device.type == "cpu"


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@torch.no_grad()
def test_dense_forward_matches_diffusers(ref_model, ours, backend):
    ours.set_attention_backend(backend)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 12, IN, generator=g)
    text = torch.randn(2, 6, TEXT, generator=g)
    pooled = torch.randn(2, POOLED, generator=g)
    t = torch.tensor([0.95, 0.3])
    guidance = torch.tensor([3.5, 5.0]) if ref_model.config.guidance_embeds else None
    args = (x, text, pooled, t, image_ids(3, 4), torch.zeros(6, 3), guidance)
    (ref,) = ref_model(*args, return_dict=False)
    (out,) = ours(*args)
    assert out.shape == ref.shape == (2, 12, IN)
    assert rel_err(out, ref) <= TOL
    assert torch.equal(ours(*args, return_dict=True).sample, out)
    ours.set_attention_backend("reference")


@pytest.mark.parametrize("backend", ["reference", "auto"])
@torch.no_grad()
def test_packed_forward_matches_each_sample_alone_and_diffusers(ref_model, ours, backend):
    ours.set_attention_backend(backend)
    samples = three_samples(ours)
    outs = ours.forward_packed(samples)
    assert len(outs) == 3
    for s, out in zip(samples, outs):
        assert out.shape == (s.latents.shape[0], IN)
        assert rel_err(out, ours.forward_packed([s])[0]) <= TOL  # alone: the dense layout
        assert rel_err(out, ref_single(ref_model, s)) <= TOL
    ours.set_attention_backend("reference")


@torch.no_grad()
def test_sample_output_independent_of_pack(ours):
    a, b = three_samples(ours)[:2]
    same_shape = make_sample(3, 4, 5, 0.2, guidance_for(ours, 2.0), seed=9)  # a's shapes and ids: stacked dense
    alone = ours.forward_packed([a])[0]
    for pack, index in (([a, b], 0), ([b, a], 1), ([a, same_shape], 0), ([b, same_shape, a], 2), ([a, b, same_shape], 0)):
        assert rel_err(ours.forward_packed(pack)[index], alone) <= TOL


def test_packed_layout_puts_samples_of_one_length_side_by_side():
    """The joint sequence holds the samples shortest first (equal lengths adjacent, in batch order), so
    per-sample attention runs each length once; rows still name each token's sample in the batch, and
    split undoes join."""
    txt_lens, img_lens = [5, 7, 5, 3], [12, 4, 12, 4]  # joint lengths 17, 11, 17, 7
    layout = TokenLayout.packed(txt_lens, img_lens, torch.device("cpu"))
    assert layout.metadata.seq_lens_q == (7, 11, 17, 17)
    assert layout.joint_rows[0].tolist() == [3] * 7 + [1] * 11 + [0] * 17 + [2] * 17
    assert layout.txt_rows[0].tolist() == [0] * 5 + [1] * 7 + [2] * 5 + [3] * 3
    assert layout.img_rows[0].tolist() == [0] * 12 + [1] * 4 + [2] * 12 + [3] * 4
    txt = torch.arange(sum(txt_lens)).float()[None, :, None]
    img = 100 + torch.arange(sum(img_lens)).float()[None, :, None]
    joint = layout.join(txt, img)
    assert joint[0, :7, 0].tolist() == [17, 18, 19, 128, 129, 130, 131]  # sample 3: its text, then its image
    assert all(torch.equal(x, y) for x, y in zip(layout.split(joint, txt.shape[1]), (txt, img)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["sdpa_cudnn_per_sample", "varlen"])
@torch.no_grad()
def test_gpu_packed_samples_of_one_size_match_each_alone(ref_model, backend):
    """bf16 on a GPU, a pack that interleaves two sizes (each size twice): the joint sequence groups
    them, so cuDNN per sample runs one batched call a size; each output is what the sample gets alone
    (dense, through cuDNN)."""
    model = ours_from(ref_model, backend).to("cuda", torch.bfloat16)

    def on_gpu(s: FluxSample) -> FluxSample:
        return dataclasses.replace(
            s, latents=s.latents.to("cuda", torch.bfloat16), text=s.text.to("cuda", torch.bfloat16),
            pooled=s.pooled.to("cuda", torch.bfloat16), timestep=s.timestep.cuda(), img_ids=s.img_ids.cuda(),
            txt_ids=s.txt_ids.cuda(), guidance=None if s.guidance is None else s.guidance.cuda())

    g = guidance_for(model, 3.5)
    samples = [on_gpu(make_sample(h, w, n, t, g, seed)) for h, w, n, t, seed in
               ((3, 4, 5, 0.9, 21), (2, 2, 7, 0.4, 22), (3, 4, 5, 0.3, 23), (2, 2, 7, 0.6, 24))]
    packed = model.forward_packed(samples)
    model.set_attention_backend("sdpa_cudnn")
    for s, out in zip(samples, packed):
        assert rel_err(out.float(), model.forward_packed([s])[0].float()) <= 3e-2  # bf16 rounding; a wrong layout is ~1


@torch.no_grad()
def test_packed_modulation_is_per_sample(ours):
    """Two samples that differ only in timestep (or only in pooled text) must get different outputs,
    each the one it gets alone: rows pick each token's own conditioning."""
    a = make_sample(2, 3, 4, 0.9, guidance_for(ours, 3.0), seed=11)
    b = make_sample(3, 2, 4, 0.1, guidance_for(ours, 3.0), seed=11)
    outs = ours.forward_packed([a, b])
    for s, out in zip((a, b), outs):
        assert rel_err(out, ours.forward_packed([s])[0]) <= TOL


def test_compile_blocks_matches_eager(ref_model):
    """torch.compile (dynamo + AOT autograd, no codegen: fast on a CPU), dense and packed."""
    torch._dynamo.reset()
    model = ours_from(ref_model)
    samples = three_samples(model)
    dense_input = [samples[0], make_sample(3, 4, 5, 0.5, guidance_for(model, 2.0), seed=12)]
    with torch.no_grad():
        dense = model.forward_packed(dense_input)
        packed = model.forward_packed(samples)
        model.compile_blocks(backend="aot_eager", fullgraph=False)
        for got, ref in zip([*model.forward_packed(dense_input), *model.forward_packed(samples)], [*dense, *packed]):
            assert rel_err(got, ref) <= 1e-6
    torch._dynamo.reset()


@torch.no_grad()
def test_interrupt_stops_between_blocks(ours):
    total = ours.config.num_layers + ours.config.num_single_layers
    samples = three_samples(ours)
    asked = []

    def never() -> bool:
        asked.append(1)
        return False

    ours.forward_packed(samples, interrupt=never)
    assert len(asked) == total - 1  # between blocks: not before the first

    for stop_at in range(1, total):  # stop before block `stop_at` (double- or single-stream)
        calls = []

        def at(stop_at=stop_at, calls=calls) -> bool:
            calls.append(1)
            return len(calls) == stop_at

        for pack in (samples, samples[:1]):  # packed and dense layouts
            calls.clear()
            with pytest.raises(StepInterrupted) as info:
                ours.forward_packed(pack, interrupt=at)
            assert (info.value.block, info.value.blocks) == (stop_at, total)


@torch.no_grad()
def test_bad_inputs_raise_clearly(ours):
    s = make_sample(2, 2, 3, 0.5, guidance_for(ours, 2.0), seed=13)
    flipped = None if ours.config.guidance_embeds else torch.tensor(2.0)
    wrong_guidance = FluxSample(**{**s.__dict__, "guidance": flipped})
    with pytest.raises(ValueError, match="guidance_embeds"):
        ours.forward_packed([wrong_guidance])
    with pytest.raises(ValueError, match="img_ids"):
        ours.forward_packed([FluxSample(**{**s.__dict__, "img_ids": s.img_ids[:-1]})])
    with pytest.raises(ValueError, match="in_channels"):
        ours.forward_packed([FluxSample(**{**s.__dict__, "latents": s.latents[:, :-1]})])
    with pytest.raises(ValueError, match="joint_attention_dim"):
        ours.forward_packed([FluxSample(**{**s.__dict__, "text": torch.zeros(3, TEXT + 1)})])
    with pytest.raises(ValueError, match="pooled"):
        ours.forward_packed([FluxSample(**{**s.__dict__, "pooled": torch.zeros(POOLED + 1)})])
    with pytest.raises(ValueError, match="at least one"):
        ours.forward_packed([])
    with pytest.raises(ValueError, match="joint_attention_kwargs"):
        ours(s.latents[None], s.text[None], s.pooled[None], s.timestep[None], s.img_ids, s.txt_ids,
             None if s.guidance is None else s.guidance[None], joint_attention_kwargs={"scale": 1.0})


def test_bad_configs_raise_clearly():
    with pytest.raises(ValueError, match="sum to attention_head_dim"):
        FluxTransformer2DModel.from_config({**TINY, "axes_dims_rope": [4, 6, 4]})
    with pytest.raises(ValueError, match="even"):
        FluxTransformer2DModel.from_config({**TINY, "attention_head_dim": 15, "axes_dims_rope": [3, 6, 6]})
    with pytest.raises(ValueError, match="guidance_embeds"):
        FluxTransformer2DModel.from_config({**TINY, "guidance_embeds": "yes"})
    model = FluxTransformer2DModel.from_config({**TINY, "_class_name": "FluxTransformer2DModel", "future_key": 1})
    assert model.config.num_single_layers == 2


def test_meta_construction_and_assign_load(ref_model):
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(dict(ref_model.config))
    assert all(p.is_meta for p in model.parameters())
    model.load_state_dict(ref_model.state_dict(), strict=True, assign=True)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    s = three_samples(model)[1]
    with torch.no_grad():
        assert rel_err(model.forward_packed([s])[0], ref_single(ref_model, s)) <= TOL


@torch.no_grad()
def test_bfloat16_matches_diffusers(ref_model):
    """Pure bf16 on both sides. Dense: the same ops in the same order (rotary tables float32 on
    both), so equal in practice. Packed (another attention kernel): bf16-close."""
    ref = randomized(build_tiny_flux_transformer(0, guidance_embeds=ref_model.config.guidance_embeds), 1)
    ref = ref.to(torch.bfloat16)
    ours = ours_from(ref, backend="sdpa").to(torch.bfloat16)
    samples = [FluxSample(**{**s.__dict__, "latents": s.latents.bfloat16(), "text": s.text.bfloat16(),
                             "pooled": s.pooled.bfloat16(), "img_ids": s.img_ids.bfloat16()})  # as FluxPipeline
               for s in three_samples(ours)]
    expect = [ref_single(ref, s) for s in samples]
    out = ours.forward_packed(samples[:1])[0]
    assert out.dtype == torch.bfloat16
    assert rel_err(out, expect[0]) <= 1e-6
    ours.set_attention_backend("auto")
    for got, want in zip(ours.forward_packed(samples), expect):
        assert got.dtype == torch.bfloat16 and rel_err(got, want) <= 3e-2


# ----------------------------------------------------------------------------- folders


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def tiny_flux_path(request, tmp_path_factory) -> Path:
    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny_flux") / "pipeline", seed=0,
                                    guidance_embeds=request.param)


def test_builder_is_deterministic_and_leaves_the_rng(tmp_path):
    state = torch.get_rng_state()
    a = build_tiny_flux_pipeline(tmp_path / "a", seed=3)
    b = build_tiny_flux_pipeline(tmp_path / "b", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for part in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "text_encoder_2/model.safetensors"):
        assert (a / part).read_bytes() == (b / part).read_bytes(), part
    with pytest.raises(FileExistsError):
        build_tiny_flux_pipeline(a, seed=3)


def test_diffusers_flux_pipeline_runs_the_tiny_folder(tiny_flux_path):
    import json

    config = json.loads((tiny_flux_path / "transformer" / "config.json").read_text())
    pipe = diffusers.FluxPipeline.from_pretrained(tiny_flux_path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 4
    assert pipe.transformer.config.guidance_embeds == config["guidance_embeds"]
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.max_shift == 1.15
    images = [pipe("a red circle on a blue background", height=32, width=48, num_inference_steps=2,
                   guidance_scale=3.5, generator=torch.Generator().manual_seed(0), output_type="np").images
              for _ in range(2)]
    assert images[0].shape == (1, 32, 48, 3)
    assert (images[0] == images[1]).all()  # same seed, same image
    assert 0.5 < ((images[0] > 0.001) & (images[0] < 0.999)).mean()  # an image, not a saturated field


def load_ours(root: Path) -> FluxTransformer2DModel:
    return load_component(root, "transformer", lambda c: FluxTransformer2DModel.from_config(c, "reference"),
                          device="cpu", dtype=torch.float32, keep_float32=FluxTransformer2DModel._keep_in_fp32_modules)


@torch.no_grad()
def test_load_component_reads_the_pipeline_folder(tiny_flux_path):
    reference = diffusers.FluxTransformer2DModel.from_pretrained(tiny_flux_path, subfolder="transformer").eval()
    ours = load_ours(tiny_flux_path)
    assert isinstance(ours, FluxTransformer2DModel) and not ours.training
    assert ours.config.guidance_embeds == reference.config.guidance_embeds
    samples = three_samples(ours)
    for s, out in zip(samples, ours.forward_packed(samples)):
        assert rel_err(out, ref_single(reference, s)) <= TOL


@torch.no_grad()
def test_load_component_reads_save_pretrained(ref_model, tmp_path):
    """A randomized model written by diffusers' `save_pretrained` (every weight matters)."""
    import json

    ref_model.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    ours = load_ours(tmp_path)
    samples = three_samples(ours)
    for s, out in zip(samples, ours.forward_packed(samples)):
        assert rel_err(out, ref_single(ref_model, s)) <= TOL
