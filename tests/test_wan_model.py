"""Our Wan DiT against diffusers' on a tiny random checkpoint (CPU, float32)."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ditserve.models import WanTransformer3DModel  # noqa: E402

TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=32,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)
TOL = 1e-5


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.fixture(scope="module")
def ref_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**TINY).eval()
    with torch.no_grad():  # every parameter random, including the ones diffusers zero/one-inits
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def ours(ref_model) -> WanTransformer3DModel:
    model = WanTransformer3DModel.from_config(dict(ref_model.config), attention_backend="reference").eval()
    model.load_state_dict(ref_model.state_dict(), strict=True)
    return model


def sample(frames: int, height: int, width: int, text_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(TINY["in_channels"], frames, height, width, generator=g)
    text = torch.randn(text_len, TINY["text_dim"], generator=g)
    return latent, text


def ref_single(ref_model, latent: torch.Tensor, t: float, text: torch.Tensor) -> torch.Tensor:
    (out,) = ref_model(latent[None], torch.tensor([t]), text[None], return_dict=False)
    return out[0]


def test_state_dict_keys_and_shapes_match_diffusers(ref_model, ours):
    ref_shapes = {k: tuple(v.shape) for k, v in ref_model.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@torch.no_grad()
def test_dense_forward_matches_diffusers(ref_model, ours, backend):
    ours.set_attention_backend(backend)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 4, 6, generator=g)
    t = torch.tensor([900.0, 37.5])
    text = torch.randn(2, 7, TINY["text_dim"], generator=g)
    (ref,) = ref_model(x, t, text, return_dict=False)
    (out,) = ours(x, t, text, return_dict=False)
    assert out.shape == ref.shape == (2, 4, 3, 4, 6)
    assert rel_err(out, ref) <= TOL
    assert torch.equal(ours(x, t, text, return_dict=True).sample, out)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@torch.no_grad()
def test_packed_forward_matches_each_sample_alone(ref_model, ours, backend):
    ours.set_attention_backend(backend)
    samples = [sample(2, 4, 6, 5, seed=2), sample(1, 6, 4, 7, seed=3), sample(3, 2, 2, 3, seed=4)]
    timesteps = [999.0, 500.0, 3.0]
    outs = ours.forward_packed([s[0] for s in samples], torch.tensor(timesteps), [s[1] for s in samples])
    assert len(outs) == 3
    for (latent, text), t, out in zip(samples, timesteps, outs):
        ref = ref_single(ref_model, latent, t, text)
        assert out.shape == latent.shape
        assert rel_err(out, ref) <= TOL


@torch.no_grad()
def test_sample_output_independent_of_pack(ours):
    ours.set_attention_backend("reference")
    (a_lat, a_txt), (b_lat, b_txt), (c_lat, c_txt) = sample(2, 4, 6, 5, 5), sample(1, 2, 8, 9, 6), sample(2, 4, 6, 5, 7)
    alone = ours.forward_packed([a_lat], [250.0], [a_txt])[0]  # one sample: dense layout
    with_b = ours.forward_packed([a_lat, b_lat], [250.0, 10.0], [a_txt, b_txt])[0]  # packed layout
    with_b_first = ours.forward_packed([b_lat, a_lat], [10.0, 250.0], [b_txt, a_txt])[1]
    with_c = ours.forward_packed([a_lat, c_lat], [250.0, 700.0], [a_txt, c_txt])[0]  # same shape: stacked dense
    for other in (with_b, with_b_first, with_c):
        assert rel_err(other, alone) <= TOL


def test_unsupported_configs_raise_clearly():
    with pytest.raises(NotImplementedError, match="image-conditioned"):
        WanTransformer3DModel(**TINY, image_dim=8)
    with pytest.raises(NotImplementedError, match="image-conditioned"):
        WanTransformer3DModel.from_config({**TINY, "added_kv_proj_dim": 16})
    with pytest.raises(ValueError, match="qk_norm"):
        WanTransformer3DModel.from_config({**TINY, "qk_norm": "layer_norm"})
    with pytest.raises(ValueError, match="attention_head_dim"):
        WanTransformer3DModel.from_config({**TINY, "attention_head_dim": 7})
    with pytest.raises(ValueError, match="patch_size"):
        WanTransformer3DModel.from_config({**TINY, "patch_size": 2})
    # metadata keys and keys diffusers itself ignores are skipped
    model = WanTransformer3DModel.from_config({**TINY, "_class_name": "WanTransformer3DModel", "window_size": [-1, -1]})
    assert model.config.num_layers == 2


@torch.no_grad()
def test_bad_inputs_raise_clearly(ours):
    latent, text = sample(2, 4, 6, 5, 8)
    with pytest.raises(ValueError, match="divisible"):
        ours.forward_packed([latent[:, :, :3]], [1.0], [text])
    with pytest.raises(ValueError, match="channels"):
        ours.forward_packed([latent[:3]], [1.0], [text])
    with pytest.raises(ValueError, match="one timestep per sample"):
        ours.forward_packed([latent, latent], [1.0], [text, text])
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        ours.forward_packed([torch.zeros(4, 33, 2, 2)], [1.0], [text])


def test_meta_construction_and_assign_load(ref_model):
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(dict(ref_model.config))
    assert all(p.is_meta for p in model.parameters())
    model.load_state_dict(ref_model.state_dict(), strict=True, assign=True)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    latent, text = sample(1, 2, 4, 3, 9)
    with torch.no_grad():
        out = model.forward_packed([latent], [5.0], [text])[0]
    assert torch.isfinite(out).all()


@torch.no_grad()
def test_bfloat16_matches_diffusers(ref_model, tmp_path):
    """Pure bf16, and bf16 with diffusers' keep-in-fp32 modules (what from_pretrained does).

    Our rotary tables are always float32. diffusers' `.to(bfloat16)` also rounds its rope
    buffers to bf16 (from_pretrained keeps them float32), so the pure-bf16 reference gets a
    fresh float32 rope to compare like with like.
    """
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 4, 3, 4, 6, generator=g).bfloat16()
    t = torch.tensor([800.0, 20.0])
    text = torch.randn(2, 7, TINY["text_dim"], generator=g).bfloat16()

    ref_model.save_pretrained(tmp_path)
    mixed_ref = diffusers.WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    pure_ref = diffusers.WanTransformer3DModel.from_pretrained(tmp_path).eval().to(torch.bfloat16)
    pure_ref.rope = WanRotaryPosEmbed(TINY["attention_head_dim"], TINY["patch_size"], TINY["rope_max_seq_len"])
    for ref in (mixed_ref, pure_ref):
        with torch.device("meta"):
            ours = WanTransformer3DModel(**TINY, attention_backend="sdpa").eval()
        ours.load_state_dict(ref.state_dict(), strict=True, assign=True)  # dtypes as the reference has them
        (expect,) = ref(x, t, text, return_dict=False)
        (out,) = ours(x, t, text)
        assert out.dtype == torch.bfloat16
        assert rel_err(out, expect) <= 1e-6  # the same ops in the same order: equal in practice

        # packed (reference attention, different kernel): bf16-close to each sample alone
        ours.set_attention_backend("reference")
        lat_b, text_b = sample(1, 6, 4, 5, seed=13)
        outs = ours.forward_packed([x[0], lat_b.bfloat16()], t, [text[0], text_b.bfloat16()])
        assert rel_err(outs[0], expect[0]) <= 2e-2


def _fused(ref_model) -> WanTransformer3DModel:
    model = WanTransformer3DModel.from_config(dict(ref_model.config), attention_backend="reference").eval()
    model.load_state_dict(ref_model.state_dict(), strict=True)
    model.fuse_qkv_projections()
    return model


def _shares_fused_storage(model: WanTransformer3DModel) -> bool:
    fused = [block.attn1 for block in model.blocks]
    return all(
        a._qkv is not None
        and all(lin.weight.untyped_storage().data_ptr() == a._qkv[0].untyped_storage().data_ptr()
                for lin in (a.to_q, a.to_k, a.to_v))
        for a in fused
    )


def test_fused_qkv_matches_diffusers_and_keeps_its_keys(ref_model, ours):
    fused = _fused(ref_model)
    assert _shares_fused_storage(fused)  # views of one weight: no extra memory
    state = fused.state_dict()
    assert state.keys() == ref_model.state_dict().keys()
    for key, value in ref_model.state_dict().items():
        assert torch.equal(state[key], value), key
    latent, text = sample(3, 4, 6, 7, seed=1)
    with torch.no_grad():
        out = fused(latent[None], torch.tensor([321.0]), text[None])[0]
        assert rel_err(out, ref_single(ref_model, latent, 321.0, text)) <= TOL
        packed = fused.forward_packed([latent, latent[:, :1]], [321.0, 5.0], [text, text[:3]])
        assert rel_err(packed[0], out[0]) <= TOL


def test_fused_qkv_follows_load_state_dict_and_to(ref_model):
    fused = _fused(ref_model)
    torch.manual_seed(5)
    other = diffusers.WanTransformer3DModel(**TINY).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    fused.load_state_dict(other.state_dict(), strict=True)  # copies into the views
    latent, text = sample(2, 4, 4, 5, seed=2)
    with torch.no_grad():
        out = fused(latent[None], torch.tensor([700.0]), text[None])[0]
        assert rel_err(out, ref_single(other, latent, 700.0, text)) <= TOL
        fused.to(torch.float64)  # converts each parameter; the fused weight must follow
        assert _shares_fused_storage(fused) and fused.blocks[0].attn1._qkv[0].dtype == torch.float64
        out64 = fused(latent[None].double(), torch.tensor([700.0]), text[None].double())[0]
        assert rel_err(out64, ref_single(other.double(), latent.double(), 700.0, text.double())) <= 1e-12


def test_compiled_blocks_trace_the_fused_paths(ref_model):
    """torch.compile (dynamo + AOT autograd, no codegen: fast on a CPU) goes through the custom
    ops (q/k norm + rotary, linear + GELU) and the fused q/k/v, dense and packed, to the same result."""
    torch._dynamo.reset()
    model = _fused(ref_model)
    samples = [sample(2, 4, 6, 5, seed=8), sample(1, 2, 4, 3, seed=9)]
    with torch.no_grad():
        dense = model(samples[0][0][None], torch.tensor([600.0]), samples[0][1][None])[0]
        packed = model.forward_packed([s[0] for s in samples], [600.0, 20.0], [s[1] for s in samples])
        model.compile_blocks(backend="aot_eager", fullgraph=False)
        assert rel_err(model(samples[0][0][None], torch.tensor([600.0]), samples[0][1][None])[0], dense) <= 1e-6
        for got, ref in zip(model.forward_packed([s[0] for s in samples], [600.0, 20.0], [s[1] for s in samples]),
                            packed):
            assert rel_err(got, ref) <= 1e-6
    torch._dynamo.reset()
