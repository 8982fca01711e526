"""Tiny random Cosmos3 pipeline folders, built offline, for tests.

`build_tiny_cosmos3_pipeline` writes a folder with diffusers' own `Cosmos3OmniPipeline(...)
.save_pretrained`, so it has exactly the layout, file names and config keys of a published
Cosmos3 checkpoint (transformer/, vae/, scheduler/, text_tokenizer/, model_index.json), only
with random weights and tiny sizes. Two backbones, as the published checkpoints have them:

- "nano": the Qwen3-VL-style text tower (SwiGLU MLPs, per-head q/k RMSNorm on the text too),
  UniPC on Karras flow sigmas, a system prompt;
- "edge": the Nemotron-style tower (relu2 MLPs, Nemotron RMSNorm, no text q/k norm, a separate
  norm of the text keys the generation tower reads), `use_native_flow_schedule`, no system prompt.

Both carry action and sound heads (as the published Nano does), which a text-to-video runtime
must load and may drop. Nothing is downloaded: the tokenizer is a byte-level BPE over the small
English vocabulary of `helpers.checkpoints`, with Qwen's special tokens and a Qwen-style chat
template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from helpers.checkpoints import (
    _WORDS,
    _break_symmetry,
    _byte_symbols,
    _empty_target,
    build_tiny_wan22_vae_config,
)

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_tiny_cosmos3_pipeline", "build_tiny_cosmos3_tokenizer",
           "build_tiny_cosmos3_transformer", "build_tiny_cosmos3_transformer_config"]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
# Qwen's chat layout: one block per message, then the assistant's turn when asked for.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _bpe_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte symbols alone, then each `_WORDS` word built left to right, bare and after a space
    (GPT-2's `Ġ`), so prompts tokenize into few tokens and anything else byte by byte."""
    tokens = list(_byte_symbols())
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in dict.fromkeys(w.lower() for w in _WORDS):
        for start in (word, "\u0120" + word):
            left = start[0]
            for char in start[1:]:
                rule = (left, char)
                left += char
                if rule not in seen:
                    seen.add(rule)
                    merges.append(rule)
                    tokens.append(left)
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}, merges


def build_tiny_cosmos3_tokenizer() -> Any:
    """A Qwen-style byte-level BPE fast tokenizer with `<|vision_start|>` and a chat template; eos
    `<|im_end|>` as Qwen3's. Saved as tokenizer.json and reloaded by `AutoTokenizer`."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _bpe_vocab_and_merges()
    tok = Tokenizer(BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=4096)


def build_tiny_cosmos3_transformer_config(vocab_size: int, backbone: str = "nano") -> dict[str, Any]:
    """Constructor arguments of a tiny `Cosmos3OmniTransformer` (grouped-query: 4 query heads, 2 K/V).

    head_dim 8: the mRoPE sections (2, 1, 1) cover its 4 frequencies (time, height, width
    interleaved as published). 48 latent channels in 2x2 patches (192 features), as the Wan2.2 VAE.
    """
    if backbone not in ("nano", "edge"):
        raise ValueError(f"backbone must be 'nano' or 'edge', got {backbone!r}")
    edge = backbone == "edge"
    return {
        "hidden_size": 32,
        "head_dim": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "latent_channel": 48,
        "latent_patch_size": 2,
        "patch_latent_dim": 192,
        "vocab_size": vocab_size,
        "rope_theta": 5_000_000.0,
        "rope_axes_dim": [2, 1, 1],
        "base_fps": 24,
        "enable_fps_modulation": True,
        "unified_3d_mrope_reset_spatial_ids": True,
        "unified_3d_mrope_temporal_modality_margin": 15000,
        "hidden_act": "relu2" if edge else "silu",
        "qk_norm_for_text": not edge,
        "use_und_k_norm_for_gen": edge,
        "action_gen": True,
        "action_dim": 8,
        "num_embodiment_domains": 4,
        "sound_gen": True,
        "sound_dim": 8,
    }


@torch.no_grad()
def _randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random and large enough to matter: norm weights near 1, the rest N(0, 0.2^2)
    (default inits leave the output projection tiny, so a wrong term would hardly show)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        p.copy_(1 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.2 * noise)
    return module.eval()


def build_tiny_cosmos3_transformer(vocab_size: int, seed: int = 0, backbone: str = "nano") -> Any:
    """diffusers' tiny `Cosmos3OmniTransformer` (float32, eval), random weights from `seed`; the
    global torch RNG is left as it was."""
    from diffusers import Cosmos3OmniTransformer

    config = build_tiny_cosmos3_transformer_config(vocab_size, backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _randomized(Cosmos3OmniTransformer(**config), seed)


def _scheduler(backbone: str) -> Any:
    """UniPC on flow sigmas: Karras-spaced for "nano", the pipeline's native linspace for "edge"."""
    from diffusers import UniPCMultistepScheduler

    if backbone == "edge":
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=12.0,
                                       num_train_timesteps=1000)
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, use_karras_sigmas=True,
                                   sigma_min=0.01, sigma_max=200.0, num_train_timesteps=1000)


def build_tiny_cosmos3_pipeline(path: str | Path, seed: int = 0, *, backbone: str = "nano") -> Path:
    """Write a tiny random Cosmos3 folder loadable by `diffusers.Cosmos3OmniPipeline.from_pretrained`.

    backbone "nano" or "edge" (see the module docstring). The VAE is the tiny Wan2.2 VAE of
    `helpers.checkpoints` (48 channels, 16x spatial / 4x temporal compression). No safety checker.
    Same `seed`, same weights; the global torch RNG is left as it was. `path` must not exist or
    be an empty folder.
    """
    from diffusers import AutoencoderKLWan, Cosmos3OmniPipeline

    path = _empty_target(path)
    tokenizer = build_tiny_cosmos3_tokenizer()
    transformer = build_tiny_cosmos3_transformer(len(tokenizer), seed, backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(**build_tiny_wan22_vae_config())
        _break_symmetry(vae, torch.Generator().manual_seed(seed + 1))
    edge = backbone == "edge"
    pipe = Cosmos3OmniPipeline(transformer=transformer, text_tokenizer=tokenizer, vae=vae.eval(),
                               scheduler=_scheduler(backbone), enable_safety_checker=False,
                               default_use_system_prompt=not edge, use_native_flow_schedule=edge)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
