"""A tiny random Wan2.1 text-to-video pipeline folder, built offline, for tests.

The folder is written by diffusers' and transformers' own classes (`save_pretrained`), so
it has exactly the layout, file names and config keys of a published Wan2.1 checkpoint
(e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers), only with random weights and tiny sizes. Nothing
is downloaded: the tokenizer is a T5-style Unigram tokenizer over a small built-in English
vocabulary. Tests compare ditserve against `diffusers.WanPipeline.from_pretrained(path)`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = [
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


def build_tiny_wan_pipeline(path: str | Path, seed: int = 0, *, scheduler: str = "unipc") -> Path:
    """Write a tiny random Wan2.1 T2V pipeline folder loadable by `diffusers.WanPipeline.from_pretrained`.

    scheduler: "unipc" (Wan2.1's published `UniPCMultistepScheduler` flow config, shift 3) or
    "euler" (`FlowMatchEulerDiscreteScheduler`, shift 3). Same `seed`, same weights. The
    global torch RNG is left as it was. `path` must not exist or be an empty folder.
    """
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path}: exists and is not an empty folder; refusing to write a pipeline into it")
    if scheduler == "unipc":
        sched = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
        )
    elif scheduler == "euler":
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        raise ValueError(f"scheduler must be 'unipc' or 'euler', got {scheduler!r}")

    with torch.random.fork_rng(devices=[]):
        tokenizer = build_tiny_t5_tokenizer()
        te_config = UMT5Config(**build_tiny_umt5_config(len(tokenizer)))
        text_encoder = _seeded(seed, lambda: UMT5EncoderModel(te_config))
        transformer = _seeded(seed, lambda: WanTransformer3DModel(**build_tiny_wan_transformer_config()))
        vae = _seeded(seed, lambda: AutoencoderKLWan(**build_tiny_wan_vae_config()))

    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=sched
    )
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
