"""Tiny random Wan pipeline folders, built offline, for tests.

- `build_tiny_wan_pipeline`: Wan2.1 text-to-video (as Wan-AI/Wan2.1-T2V-1.3B-Diffusers);
- `build_tiny_wan22_a14b_pipeline`: Wan2.2 T2V-A14B: two DiTs (high / low noise), `boundary_ratio`;
- `build_tiny_wan22_ti2v_pipeline`: Wan2.2 TI2V-5B: `expand_timesteps` (per-token timesteps),
  the 48-channel Wan2.2 VAE (16x spatial compression).

Each folder is written by diffusers' and transformers' own classes (`save_pretrained`), so
it has exactly the layout, file names and config keys of the published checkpoint, only with
random weights and tiny sizes. Nothing is downloaded: the tokenizer is a T5-style Unigram
tokenizer over a small built-in English vocabulary. Tests compare ditserve against
`diffusers.WanPipeline.from_pretrained(path)`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = [
    "build_tiny_wan22_a14b_pipeline",
    "build_tiny_wan22_ti2v_pipeline",
    "build_tiny_wan22_transformer_config",
    "build_tiny_wan22_vae_config",
    "build_tiny_wan_pipeline",
    "build_tiny_wan_transformer_config",
    "build_tiny_wan_vae_config",
    "build_tiny_umt5_config",
    "build_tiny_t5_tokenizer",
    "TINY_MAX_SEQUENCE_LENGTH",
]

M = TypeVar("M", bound=nn.Module)

TINY_MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default max_sequence_length; the tokenizer's model_max_length

# A small English vocabulary: whole-word pieces for common prompt words, then single
# characters as a fallback, so any ASCII prompt tokenizes without <unk> for letters.
_WORDS = """
a an the of in on at with and or to from by for is are this that it its into over under
red green blue yellow black white orange purple pink brown gray
circle square triangle ball box cube line dot star shape
cat dog bird fish horse car tree flower house sky sea water fire snow city road street
man woman child people robot astronaut
big small tall short bright dark fast slow happy slowly quickly
running walking flying swimming dancing moving rotating spinning
video image photo picture scene close up view light sun moon night day background
blurry low quality worst bad ugly static noisy overexposed subtitles artifacts
""".split()
_FALLBACK_CHARS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" + ".,!?;:'\"-()/&"
)


def build_tiny_wan_transformer_config() -> dict[str, Any]:
    """Constructor arguments of the tiny `WanTransformer3DModel` (as in diffusers' own tests).

    head_dim 12 splits into rotary parts t=4, h=4, w=4 (h = w = 2 * (head_dim // 6)).
    """
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=32,
    )


def build_tiny_wan_vae_config() -> dict[str, Any]:
    """Constructor arguments of the tiny `AutoencoderKLWan` (z_dim 16 to match the transformer)."""
    return dict(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


def build_tiny_wan22_transformer_config() -> dict[str, Any]:
    """The tiny TI2V transformer: the Wan2.1 tiny one with 48 latent channels in and out
    (TI2V-5B's DiT is the Wan2.1 architecture on the Wan2.2 VAE's latents)."""
    return dict(build_tiny_wan_transformer_config(), in_channels=48, out_channels=48)


def build_tiny_wan22_vae_config() -> dict[str, Any]:
    """Constructor arguments of a tiny Wan2.2 `AutoencoderKLWan` (TI2V-5B's VAE, shrunk).

    As published: z_dim 48, residual down/up blocks (`is_residual`), pixels patchified 2x2
    before the encoder (`patch_size` 2, so 3 * 2 * 2 = 12 channels in and out), hence 16x
    spatial and 4x temporal compression. Only the widths and depths are tiny. latents_mean /
    latents_std are fixed pseudo-random values (48 each), not the published ones.
    """
    g = torch.Generator().manual_seed(22)
    mean = (0.5 * torch.randn(48, generator=g)).tolist()
    std = (0.5 + 1.5 * torch.rand(48, generator=g)).tolist()
    return dict(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=48,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        dropout=0.0,
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_temporal=4,
        scale_factor_spatial=16,
        latents_mean=[round(v, 4) for v in mean],
        latents_std=[round(v, 4) for v in std],
    )


def build_tiny_umt5_config(vocab_size: int) -> dict[str, Any]:
    """`UMT5Config` arguments of the tiny text encoder; d_model 32 = the transformer's text_dim."""
    return dict(
        vocab_size=vocab_size,
        d_model=32,
        num_layers=2,
        num_heads=2,
        d_kv=8,
        d_ff=64,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )


def _unigram_vocab() -> list[tuple[str, float]]:
    """T5 layout: <pad>=0, </s>=1, <unk>=2; whole words score higher than their letters."""
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {piece for piece, _ in vocab}
    for piece, score in [("\u2581" + w, -1.0) for w in _WORDS] + [(c, -10.0) for c in _FALLBACK_CHARS]:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))
    return vocab


def build_tiny_t5_tokenizer() -> Any:
    """A T5-style (Unigram, Metaspace, appends </s>) fast tokenizer, built without any download.

    transformers >= 5: `T5Tokenizer(vocab=...)` (tokenizers-backed); it saves tokenizer.json and
    reloads through `AutoTokenizer` as `T5Tokenizer`. transformers 4.x: `T5TokenizerFast`
    around an equivalent `tokenizers.Tokenizer`. Case-sensitive, like the real umt5 tokenizer
    (a custom normalizer would not survive T5Tokenizer's reload in transformers 5).
    """
    import transformers

    vocab = _unigram_vocab()
    common = dict(eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                  model_max_length=TINY_MAX_SEQUENCE_LENGTH)
    if int(transformers.__version__.split(".")[0]) >= 5:
        return transformers.T5Tokenizer(vocab=vocab, **common)

    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    return transformers.T5TokenizerFast(tokenizer_object=tok, additional_special_tokens=[], **common)


@torch.no_grad()
def _break_symmetry(module: nn.Module, generator: torch.Generator, scale: float = 0.1) -> None:
    """Add noise to constant-valued parameters (norm weights of 1, biases of 0).

    Freshly initialised models hold many of these; with them a model would not notice a
    missing affine term or a swapped bias, so a comparison against diffusers could pass
    while ditserve is wrong.
    """
    for p in module.parameters():
        if p.is_floating_point() and p.numel() > 0 and bool((p == p.reshape(-1)[0]).all()):
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def _seeded(seed: int, build: Callable[[], M]) -> M:
    """Build a component from a fresh seed (same seed, same weights, whatever was built before)."""
    torch.manual_seed(seed)
    module = build()
    _break_symmetry(module, torch.Generator().manual_seed(seed))
    return module


def _empty_target(path: str | Path) -> Path:
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path}: exists and is not an empty folder; refusing to write a pipeline into it")
    return path


def _unipc(flow_shift: float) -> Any:
    """Wan's published scheduler: UniPC on flow-matching sigmas."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   num_train_timesteps=1000, flow_shift=flow_shift)


def _save_wan_pipeline(path: Path, seed: int, transformer_configs: list[dict[str, Any]],
                       vae_config: dict[str, Any], scheduler: Any, **pipeline_config: Any) -> Path:
    """Build the text encoder, the transformers (`transformer`, then `transformer_2`; seeds
    `seed`, `seed + 1`) and the VAE from fresh seeds, and save them with `diffusers.WanPipeline`.
    The global torch RNG is left as it was."""
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.random.fork_rng(devices=[]):
        tokenizer = build_tiny_t5_tokenizer()
        te_config = UMT5Config(**build_tiny_umt5_config(len(tokenizer)))
        text_encoder = _seeded(seed, lambda: UMT5EncoderModel(te_config))
        transformers = [_seeded(seed + i, lambda c=c: WanTransformer3DModel(**c))
                        for i, c in enumerate(transformer_configs)]
        vae = _seeded(seed, lambda: AutoencoderKLWan(**vae_config))

    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformers[0],
                       transformer_2=transformers[1] if len(transformers) > 1 else None, vae=vae,
                       scheduler=scheduler, **pipeline_config)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_wan_pipeline(path: str | Path, seed: int = 0, *, scheduler: str = "unipc") -> Path:
    """Write a tiny random Wan2.1 T2V pipeline folder loadable by `diffusers.WanPipeline.from_pretrained`.

    scheduler: "unipc" (Wan2.1's published `UniPCMultistepScheduler` flow config, shift 3) or
    "euler" (`FlowMatchEulerDiscreteScheduler`, shift 3). Same `seed`, same weights. The
    global torch RNG is left as it was. `path` must not exist or be an empty folder.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    path = _empty_target(path)
    if scheduler == "unipc":
        sched = _unipc(3.0)
    elif scheduler == "euler":
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        raise ValueError(f"scheduler must be 'unipc' or 'euler', got {scheduler!r}")
    return _save_wan_pipeline(path, seed, [build_tiny_wan_transformer_config()], build_tiny_wan_vae_config(), sched)


def build_tiny_wan22_a14b_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Wan2.2 T2V-A14B-style folder (as Wan-AI/Wan2.2-T2V-A14B-Diffusers).

    Two Wan2.1-architecture DiTs with different weights: `transformer` runs the high-noise
    steps (timestep >= boundary_ratio * 1000), `transformer_2` the rest; `boundary_ratio`
    0.875 in model_index.json; the Wan2.1 VAE (16 latent channels); UniPC with flow_shift 12.
    Same `seed`, same weights; `path` must not exist or be an empty folder.
    """
    config = build_tiny_wan_transformer_config()
    return _save_wan_pipeline(_empty_target(path), seed, [config, config], build_tiny_wan_vae_config(),
                              _unipc(12.0), boundary_ratio=0.875)


def build_tiny_wan22_ti2v_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Wan2.2 TI2V-5B-style folder (as Wan-AI/Wan2.2-TI2V-5B-Diffusers).

    `expand_timesteps: true` in model_index.json (the pipeline passes one timestep per patch
    token, `[B, S]`; image-to-video puts the first latent frame at 0), the 48-channel Wan2.2
    VAE (`build_tiny_wan22_vae_config`: sizes must be multiples of 32 = 16x VAE x 2x patch),
    a DiT with 48 channels in and out, UniPC with flow_shift 5. Same `seed`, same weights;
    `path` must not exist or be an empty folder.
    """
    return _save_wan_pipeline(_empty_target(path), seed, [build_tiny_wan22_transformer_config()],
                              build_tiny_wan22_vae_config(), _unipc(5.0), expand_timesteps=True)


# ----------------------------------------------------------------------------- Flux.1

TINY_CLIP_MAX_LENGTH = 77  # CLIP's context, the tokenizer's model_max_length (FluxPipeline pads to it)


def build_tiny_flux_transformer_config(*, guidance_embeds: bool = True) -> dict[str, Any]:
    """Constructor arguments of the tiny `FluxTransformer2DModel`.

    16 input channels = 4 VAE latent channels packed 2x2 (FluxPipeline's `in_channels // 4`);
    axes_dims_rope (4, 6, 6) sum to the head size 16; joint_attention_dim 32 = the tiny T5's
    d_model, pooled_projection_dim 16 = the tiny CLIP's hidden size. guidance_embeds: True is
    Flux.1-dev (guidance as a model input), False is Flux.1-schnell.
    """
    return dict(
        patch_size=1,
        in_channels=16,
        out_channels=None,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )


def build_tiny_flux_vae_config() -> dict[str, Any]:
    """Constructor arguments of the tiny Flux `AutoencoderKL`: 4 latent channels, 3 levels, so
    FluxPipeline's vae_scale_factor is 2 ** (3 - 1) = 4 and image sizes are multiples of 8
    (4x VAE x 2x2 packing). No quant convs and Flux.1's scaling / shift factors, as published."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        force_upcast=True,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


def build_tiny_clip_text_config(vocab_size: int, bos_token_id: int, eos_token_id: int) -> dict[str, Any]:
    """`CLIPTextConfig` arguments of the tiny CLIP text encoder; hidden 16 = pooled_projection_dim.

    eos_token_id is the tokenizer's `<|endoftext|>`: CLIP pools the hidden state at its first
    occurrence (ids other than the legacy 2 select that path)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TINY_CLIP_MAX_LENGTH,
        projection_dim=16,
        hidden_act="quick_gelu",
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


def _byte_symbols() -> list[str]:
    """The 256 symbols byte-level BPE writes bytes as: printable Latin-1 stands for itself,
    every other byte for a character from U+0100 on (the GPT-2 / CLIP convention)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    symbols, extra = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """A CLIP-style BPE: every byte symbol alone and word-final (`</w>`), the `_WORDS` built up
    left to right by merges, then `<|startoftext|>` and `<|endoftext|>` last (as CLIP's)."""
    tokens = [*_byte_symbols(), *(s + "</w>" for s in _byte_symbols())]
    merges: list[str] = []
    seen_merges: set[str] = set()
    for word in dict.fromkeys(w.lower() for w in _WORDS):
        if len(word) < 2:
            continue
        left = word[0]
        for k in range(1, len(word)):
            last = k == len(word) - 1
            right = word[k] + ("</w>" if last else "")
            rule = f"{left} {right}"
            left = left + right
            if rule not in seen_merges:
                seen_merges.add(rule)
                merges.append(rule)
                tokens.append(left)
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab, merges


def build_tiny_clip_tokenizer() -> Any:
    """A CLIP BPE tokenizer over a small built-in vocabulary, built without any download.

    Its vocab.json and merges.txt are written to a temporary folder and read by
    `CLIPTokenizer(vocab_file, merges_file)`; model_max_length 77 as CLIP's. Lower-cases, so
    any ASCII prompt tokenizes (words of `_WORDS` whole, others letter by letter).
    """
    import json
    import tempfile

    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=TINY_CLIP_MAX_LENGTH)


def build_tiny_flux_transformer(seed: int = 0, *, guidance_embeds: bool = True) -> Any:
    """diffusers' tiny `FluxTransformer2DModel` (float32, eval) from a fresh seed, its constant
    parameters (norm weights) perturbed; the global torch RNG is left as it was."""
    from diffusers import FluxTransformer2DModel

    config = build_tiny_flux_transformer_config(guidance_embeds=guidance_embeds)
    with torch.random.fork_rng(devices=[]):
        return _seeded(seed, lambda: FluxTransformer2DModel(**config)).eval()


def build_tiny_flux_pipeline(path: str | Path, seed: int = 0, *, guidance_embeds: bool = True) -> Path:
    """Write a tiny random Flux.1 pipeline folder loadable by `diffusers.FluxPipeline.from_pretrained`.

    As black-forest-labs/FLUX.1-dev (guidance_embeds=True) or FLUX.1-schnell (False): CLIP
    text encoder + CLIP BPE tokenizer (pooled embedding), T5 encoder + T5 tokenizer (sequence
    embedding, max 512 tokens), the tiny 4-channel `AutoencoderKL` (sizes in multiples of 8),
    `FlowMatchEulerDiscreteScheduler` with Flux.1-dev's dynamic shifting config (for both), and
    the tiny transformer. Same `seed`, same weights; the global torch RNG is left as it was.
    `path` must not exist or be an empty folder.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    path = _empty_target(path)
    with torch.random.fork_rng(devices=[]):
        clip_tokenizer = build_tiny_clip_tokenizer()
        clip_config = CLIPTextConfig(**build_tiny_clip_text_config(
            len(clip_tokenizer), clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id))
        clip = _seeded(seed, lambda: CLIPTextModel(clip_config))
        t5_tokenizer = build_tiny_t5_tokenizer()
        t5_config = T5Config(**build_tiny_umt5_config(len(t5_tokenizer)))
        t5 = _seeded(seed + 1, lambda: T5EncoderModel(t5_config))
        vae = _seeded(seed + 2, lambda: AutoencoderKL(**build_tiny_flux_vae_config()))
    transformer = build_tiny_flux_transformer(seed + 3, guidance_embeds=guidance_embeds)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer,
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
