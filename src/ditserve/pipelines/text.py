"""Text stage: prompt cleaning and T5-style encoding, exactly as diffusers' Wan pipelines do it.

diffusers' `prompt_clean`: ftfy.fix_text (only when ftfy is installed), html-unescape twice,
strip, collapse whitespace runs (with the `regex` module) to one space. We do the same, so
the same prompt tokenizes to the same ids.

Encoding: each prompt's embeddings are its first `len(tokens)` encoder outputs, zeros up to
`max_sequence_length`. Wan's DiT attends over all `max_sequence_length` positions (zeros
included); that is how it was trained, so that padding is part of the math. The encoder's is
not: diffusers pads to `max_sequence_length` before encoding, but the attention mask hides the
pad tokens from the real ones (and T5's relative position bias depends only on distances), so
encoding up to the longest prompt of the batch gives the same embeddings with a fraction of
the work (a short prompt: a few dozen tokens instead of 512).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

try:  # diffusers uses `regex`; fall back to `re` (same result for all common whitespace)
    import regex as _re
except ImportError:  # pragma: no cover
    import re as _re

try:
    import ftfy as _ftfy
except ImportError:
    _ftfy = None

__all__ = ["prompt_clean", "encode_prompts"]

_WHITESPACE = _re.compile(r"\s+")


def prompt_clean(text: str) -> str:
    """diffusers' Wan `prompt_clean` (basic_clean + whitespace_clean)."""
    if _ftfy is not None:
        text = _ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


@torch.no_grad()
def encode_prompts(
    tokenizer: Any,
    text_encoder: torch.nn.Module,
    prompts: Sequence[str],
    *,
    max_sequence_length: int,
    device: torch.device,
) -> Tensor:
    """Embeddings `[len(prompts), max_sequence_length, d_model]`, zero past each prompt's tokens.

    All prompts go through the encoder in one batch, padded to the longest (diffusers encodes
    prompt and negative prompt separately, each padded to `max_sequence_length`; the mask makes
    both the same math).
    """
    inputs = tokenizer(
        [prompt_clean(p) for p in prompts],
        padding="longest",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    ids, mask = inputs.input_ids, inputs.attention_mask
    seq_lens = mask.gt(0).sum(dim=1)  # on the CPU: no device sync
    hidden = text_encoder(ids.to(device), mask.to(device)).last_hidden_state
    keep = torch.arange(hidden.shape[1])[None, :] < seq_lens[:, None]  # diffusers: u[:len] then zeros
    hidden = torch.where(keep.to(device)[..., None], hidden, hidden.new_zeros(()))
    return torch.nn.functional.pad(hidden, (0, 0, 0, max_sequence_length - hidden.shape[1]))
