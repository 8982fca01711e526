"""The tiny model's tokenizer (word-level, built offline) and a differentiable prompt encoder.

The tokenizer is a T5-style Unigram tokenizer (what Wan's umt5 tokenizer is) whose pieces
are the grammar's words, plus single characters so that any other ASCII text still
tokenizes without <unk>. `encode_prompts_for_training` computes what the pipeline's text
stage computes (ditserve.pipelines.text / diffusers' `_get_t5_prompt_embeds`), with gradients
and in a compressed form that is exact for the DiT (see its docstring).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ditserve.tiny.data import GRAMMAR_WORDS

__all__ = ["MAX_SEQUENCE_LENGTH", "BiasedCrossAttention", "build_tokenizer", "encode_prompts_for_training", "tokenize"]

MAX_SEQUENCE_LENGTH = 512  # what WanPipeline pads to (its __call__ default); the DiT trains with it
_FALLBACK_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?;:'\"-()/&"


def _vocab() -> list[tuple[str, float]]:
    """T5 layout: <pad>=0, </s>=1, <unk>=2; whole words score above their letters."""
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in GRAMMAR_WORDS]
    vocab += [(c, -10.0) for c in _FALLBACK_CHARS]
    return vocab


def build_tokenizer() -> Any:
    """A `transformers.T5Tokenizer` (tokenizers-backed, transformers >= 5) over the grammar's words."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise RuntimeError(
            f"building the tiny tokenizer needs transformers >= 5 (T5Tokenizer(vocab=...)), found {transformers.__version__}"
        )
    return transformers.T5Tokenizer(
        vocab=_vocab(), eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
        model_max_length=MAX_SEQUENCE_LENGTH,
    )


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), padded to the longest prompt, as the pipeline tokenizes them."""
    inputs = tokenizer(list(prompts), padding="longest", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    return inputs.input_ids, inputs.attention_mask


def encode_prompts_for_training(
    text_encoder: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
) -> tuple[Tensor, Tensor]:
    """(text `[B, T, d_model]`, key bias `[B, T]`): the pipeline's `[B, 512, d_model]` text, compressed.

    The pipeline feeds the DiT each prompt's encoder output followed by zero rows up to
    `max_sequence_length`. Wan's cross-attention has no mask, and its text embedder and
    key/value projections act row by row, so those k identical zero rows are k identical keys
    and values: the same attention as one such row whose logit is raised by log(k). Here
    T = longest prompt + 1, and every zero row carries the bias log(its share of the padding);
    the DiT's cross-attention with this bias (`BiasedCrossAttention`) equals the pipeline's,
    for ~40x less training compute than attending over 512 rows.
    """
    hidden = text_encoder(input_ids, attention_mask).last_hidden_state
    hidden = hidden * attention_mask[..., None].to(hidden.dtype)
    hidden = torch.nn.functional.pad(hidden, (0, 0, 0, 1))  # at least one zero row per prompt
    rows = hidden.shape[1]
    lengths = attention_mask.sum(dim=1, keepdim=True).to(torch.float32)
    padding = torch.arange(rows, device=hidden.device)[None, :] >= lengths
    share = torch.log((max_sequence_length - lengths) / (rows - lengths))
    bias = torch.where(padding, share, torch.zeros_like(share))
    return hidden, bias.to(hidden.dtype)


class BiasedCrossAttention:
    """Training-time processor for the diffusers Wan DiT's cross-attention (`attn2`): adds `bias` to the keys' logits.

    Set `bias` (`[B, T]`, from `encode_prompts_for_training`) before each forward. The math
    is diffusers' `WanAttnProcessor` for text-only cross-attention (no rotary, no image
    keys) plus that additive bias; `install` / `remove` swap it in and out of every block.
    """

    def __init__(self) -> None:
        self.bias: Tensor | None = None

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, rotary_emb: Any = None) -> Tensor:
        if self.bias is None or encoder_hidden_states is None:
            raise RuntimeError("BiasedCrossAttention: set .bias and use it for cross-attention only")
        q = attn.norm_q(attn.to_q(hidden_states))
        k = attn.norm_k(attn.to_k(encoder_hidden_states))
        v = attn.to_v(encoder_hidden_states)
        q, k, v = (t.unflatten(2, (attn.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias[:, None, None, :].to(q.dtype))
        out = out.transpose(1, 2).flatten(2).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))

    def install(self, transformer: torch.nn.Module) -> None:
        for block in transformer.blocks:
            block.attn2.set_processor(self)

    @staticmethod
    def remove(transformer: torch.nn.Module) -> None:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        for block in transformer.blocks:
            block.attn2.set_processor(WanAttnProcessor())
