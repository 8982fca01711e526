"""Flux.1 diffusion transformer (text-to-image, dev and schnell), in one file.

Parameter names and shapes are those of diffusers' `FluxTransformer2DModel`, so the published
`transformer/` safetensors load with `load_state_dict(strict=True)`. The math is diffusers' op
for op (model dtype throughout; rotary angles in float64, tables in float32), so the outputs
agree to float32 rounding.

Flux runs two kinds of blocks over two token streams:
  double-stream  text and image tokens keep their own weights (modulation, q/k/v, MLP) and meet
                 only in one joint attention over [text; image] of each sample;
  single-stream  the joined sequence goes through one set of weights: attention and MLP in
                 parallel, one output projection.

One block implementation serves two layouts:
  dense   `forward(...)`        B samples of one shape: streams [B, L, dim] and [B, S, dim],
                                the joint sequence is `cat([txt, img], dim=1)`, attention on
                                [B, L + S, H, D] with no metadata.
  packed  `forward_packed(...)` samples of different sizes: streams [1, sum L_i, dim] and
                                [1, sum S_i, dim]; the joint sequence holds each sample's text
                                then its image tokens ([txt_0; img_0; txt_1; img_1; ...], one
                                gather through `TokenLayout.order`), attention on [T, H, D]
                                with `AttentionMetadata` (cu_seqlens of L_i + S_i) built once.
The conditioning embedding (timestep, guidance, pooled text) is one row per sample `[N, dim]`;
in the packed layout each token picks its sample's row through a per-token index (`rows`).

Sequence parallelism (`enable_sequence_parallel`, either layout): each sample's image tokens are
split across the ranks of a group, its text tokens stay whole on every rank. The text is short
and every image token attends to all of it, so replicating it costs little and needs no
exchange; the wrappers' `forward_joint` (Ulysses, ring or both) compute the text queries once
(a head slice or a K/V chunk per rank) and hand every rank the same text output, so the text
stream stays identical on every rank. On a
rank the joint sequence is then simply `cat([whole text, local image], dim=1)`, with rotary
angles and conditioning rows laid out the same way; the image tokens are gathered before the
output head and every rank returns the whole prediction.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ditserve.attention import Attention, AttentionMetadata, AttentionSelector
from ditserve.attention.parallel import (
    HybridAttention,
    HybridSplit,
    RingAttention,
    SequenceParallel,
    SequenceSplit,
    UlyssesAttention,
    as_sequence_parallel,
)
from ditserve.engine.errors import StepInterrupted
from ditserve.kernels.qk_norm_rotary import rotate_pairs
from ditserve.models.common import DiTModel
from ditserve.models.wan import MLP, FeedForward, linear_gelu_tanh, timestep_embedding
from ditserve.transfer import to_device, token_samples

__all__ = ["FluxSample", "FluxTransformer2DModel", "FluxTransformerConfig", "FluxTransformerOutput", "TokenLayout",
           "flux_rotary_cos_sin"]

logger = logging.getLogger(__name__)

Rotary = tuple[Tensor, Tensor]  # cos, sin: [tokens, head_dim // 2] float32, one row per joint token

_EPS = 1e-6  # every norm of Flux (layer norms, q/k RMSNorms)
_TIME_CHANNELS = 256  # sinusoidal width of the timestep and guidance embeddings
_ROPE_THETA = 10000.0


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class FluxTransformerConfig:
    """The transformer's shape; field names are the keys of diffusers' `transformer/config.json`."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.out_channels is None:  # diffusers: `out_channels or in_channels`
            set_(self, "out_channels", self.in_channels)
        if not isinstance(self.axes_dims_rope, list | tuple):
            raise ValueError(f"axes_dims_rope must be a list of ints, got {self.axes_dims_rope!r}")
        set_(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        for name in ("patch_size", "in_channels", "out_channels", "attention_head_dim", "num_attention_heads",
                     "joint_attention_dim", "pooled_projection_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("num_layers", "num_single_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.guidance_embeds, bool):
            raise ValueError(f"guidance_embeds must be true or false, got {self.guidance_embeds!r}")
        dims = self.axes_dims_rope
        if not dims or any(not isinstance(d, int) or isinstance(d, bool) or d < 2 or d % 2 for d in dims):
            raise ValueError(f"axes_dims_rope must be positive even ints (one per position axis), got {list(dims)}")
        if sum(dims) != self.attention_head_dim:
            # the rotary covers each head exactly: one part per axis of the position ids
            raise ValueError(f"axes_dims_rope {list(dims)} must sum to attention_head_dim={self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


@dataclass
class FluxTransformerOutput:
    """What `forward(..., return_dict=True)` returns (diffusers' `Transformer2DModelOutput` shape)."""

    sample: Tensor


@dataclass(frozen=True)
class FluxSample:
    """One sample of a packed forward, in the shapes diffusers' pipeline builds for one image."""

    latents: Tensor  # [S_img, in_channels]: packed 2x2 latents
    text: Tensor  # [S_txt, joint_attention_dim]: T5 embeddings
    pooled: Tensor  # [pooled_projection_dim]: CLIP pooled embedding
    timestep: Tensor  # 0-d, as diffusers passes it (t / 1000)
    img_ids: Tensor  # [S_img, n_axes] position ids
    txt_ids: Tensor  # [S_txt, n_axes] position ids
    guidance: Tensor | None = None  # 0-d guidance scale (dev) or None (schnell)


# ----------------------------------------------------------------------------- rotary


def flux_rotary_cos_sin(ids: Tensor, axes_dims: Sequence[int], theta: float = _ROPE_THETA) -> Rotary:
    """cos/sin `[N, sum(axes_dims) // 2]` (float32, on ids' device) of the multi-axis rotary.

    Axis a of the position ids rotates its own `axes_dims[a]` channels of each head. As
    diffusers' `FluxPosEmbed`: positions in float32, frequencies and angles in float64 (float32
    on MPS, which has no float64), rounded to float32 at the end. Half width: entry i rotates
    the channel pair (2i, 2i+1) (diffusers repeats each entry twice instead).
    """
    if ids.ndim != 2 or ids.shape[1] != len(axes_dims):
        raise ValueError(f"position ids must be [tokens, {len(axes_dims)}], got {tuple(ids.shape)}")
    freq_dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    pos = ids.float()
    parts_cos, parts_sin = [], []
    for axis, dim in enumerate(axes_dims):
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=freq_dtype, device=ids.device) / dim))
        angles = torch.outer(pos[:, axis].to(freq_dtype), inv_freq)  # [N, dim/2]
        parts_cos.append(angles.cos().float())
        parts_sin.append(angles.sin().float())
    return torch.cat(parts_cos, dim=-1), torch.cat(parts_sin, dim=-1)


def _rotate(x: Tensor, rotary: Rotary) -> Tensor:
    """Rotary on q or k `[..., N, H, D]` with cos/sin `[N, D/2]` (math in float32, result in x's dtype)."""
    cos, sin = rotary
    return rotate_pairs(x, cos[:, None, :], sin[:, None, :])


# ----------------------------------------------------------------------------- layout


@dataclass(eq=False)  # immutable by convention, not frozen: see AttentionMetadata
class TokenLayout:
    """Where the tokens of each sample sit, and which conditioning row each token uses.

    Dense (every field None): the joint sequence is `cat([txt, img], dim=1)` and modulation
    rows broadcast per sample. Packed: `order[j]` is the index in `cat([txt, img], dim=1)` of
    joint token j (each sample's text then its image tokens, so its tokens are contiguous for
    cu_seqlens; the samples shortest first, so that samples of one length sit side by side and
    per-sample attention runs them as one batched call), `inverse` undoes it, and `*_rows` give
    each token's sample (`[1, tokens]`, the sample's index in the batch).

    Sequence parallel (`sequence_split` set, see `parallel`): the joint sequence is
    `cat([whole text, this rank's image slice], dim=1)` in both layouts, never reordered, the
    first `text_tokens` of it text; attention goes through the split instead of `metadata`.
    """

    metadata: AttentionMetadata | None = None
    order: Tensor | None = None
    inverse: Tensor | None = None
    txt_rows: Tensor | None = None
    img_rows: Tensor | None = None
    joint_rows: Tensor | None = None
    sequence_split: SequenceSplit | HybridSplit | None = None
    text_tokens: int = 0

    @classmethod
    def packed(cls, txt_lens: Sequence[int], img_lens: Sequence[int], device: torch.device) -> TokenLayout:
        """The layout of samples with these text and image token counts (the streams hold them in
        this order; the joint sequence shortest first)."""
        txt_starts = list(itertools.accumulate(txt_lens, initial=0))
        img_starts = list(itertools.accumulate(img_lens, initial=txt_starts[-1]))
        joint_lens = [t + i for t, i in zip(txt_lens, img_lens)]
        by_length = sorted(range(len(joint_lens)), key=joint_lens.__getitem__)  # stable: equal lengths keep their order
        order = torch.cat([piece for s in by_length for piece in (
            torch.arange(txt_starts[s], txt_starts[s] + txt_lens[s]), torch.arange(img_starts[s], img_starts[s] + img_lens[s]))])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        lens = [joint_lens[s] for s in by_length]
        return cls(
            metadata=AttentionMetadata.from_lengths(lens, device=device),
            order=to_device(order, device),
            inverse=to_device(inverse, device),
            txt_rows=token_samples(txt_lens, device)[None],
            img_rows=token_samples(img_lens, device)[None],
            joint_rows=token_samples(lens, device, by_length)[None],
        )

    @classmethod
    def parallel(cls, split: SequenceSplit | HybridSplit, text_tokens: int, txt_rows: Tensor | None,
                 img_rows: Tensor | None) -> TokenLayout:
        """One rank's layout: the whole text (`text_tokens`, rows `txt_rows`), then its image
        slice (rows `img_rows`, already sharded); rows None (dense) broadcast per sample."""
        joint_rows = None if txt_rows is None else torch.cat([txt_rows, img_rows], dim=1)
        return cls(txt_rows=txt_rows, img_rows=img_rows, joint_rows=joint_rows, sequence_split=split,
                   text_tokens=text_tokens)

    def join(self, txt: Tensor, img: Tensor) -> Tensor:
        """Text `[B, L, ...]` and image `[B, S, ...]` tokens -> the joint sequence `[B, L + S, ...]`."""
        joint = torch.cat([txt, img], dim=1)
        return joint if self.order is None else joint[:, self.order]

    def split(self, joint: Tensor, text_tokens: int) -> tuple[Tensor, Tensor]:
        """The joint sequence -> (text, image) tokens; `text_tokens` is the text stream's length."""
        if self.inverse is not None:
            joint = joint[:, self.inverse]
        return joint[:, :text_tokens], joint[:, text_tokens:]


def _per_token(values: Tensor, rows: Tensor | None) -> Tensor:
    """Per-sample rows `[R, dim]` laid out to broadcast against tokens `[B, S, dim]`.

    rows None: one row per sample (R == B), so `[R, 1, dim]`, no gather. Otherwise `rows[0, s]`
    is token s's sample (`[1, T]`), so a gather to `[1, T, dim]`.
    """
    return values.unsqueeze(1) if rows is None else values[rows]


def _modulate(x: Tensor, shift: Tensor, scale: Tensor, rows: Tensor | None) -> Tensor:
    """Affine-free LayerNorm of x, scaled by `1 + scale` and shifted, in x's dtype (as diffusers)."""
    return F.layer_norm(x, x.shape[-1:], eps=_EPS) * (1 + _per_token(scale, rows)) + _per_token(shift, rows)


def _clip_fp16(x: Tensor) -> Tensor:
    """diffusers keeps float16 residuals finite after each block; bf16 and float32 need nothing."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


# ----------------------------------------------------------------------------- layers


class AdaNorm(nn.Module):
    """The modulation vectors of one adaptive LayerNorm: `linear(silu(temb))` cut into `chunks`.

    A module only so that its key reads `norm1.linear` (the norm itself has no parameters).
    Order as diffusers': (shift, scale, gate[, shift_mlp, scale_mlp, gate_mlp]); `norm_out` is
    (scale, shift).
    """

    def __init__(self, dim: int, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)

    def forward(self, temb: Tensor) -> tuple[Tensor, ...]:
        return self.linear(F.silu(temb)).chunk(self.chunks, dim=-1)


class TimeTextEmbedding(nn.Module):
    """Timestep (+ guidance for dev) + pooled text -> the conditioning embedding `[N, dim]`.

    diffusers' `CombinedTimestep[Guidance]TextProjEmbeddings`; the inputs come as the pipeline
    passes them (t / 1000, guidance scale) and are scaled by 1000 after rounding to the model
    dtype, exactly as diffusers does.
    """

    def __init__(self, dim: int, pooled_dim: int, guidance: bool) -> None:
        super().__init__()
        self.timestep_embedder = MLP(_TIME_CHANNELS, dim, approximate_gelu=False)
        self.guidance_embedder = MLP(_TIME_CHANNELS, dim, approximate_gelu=False) if guidance else None
        self.text_embedder = MLP(pooled_dim, dim, approximate_gelu=False)

    @staticmethod
    def _embed(embedder: MLP, values: Tensor, dtype: torch.dtype) -> Tensor:
        freq = timestep_embedding(values.to(dtype) * 1000, _TIME_CHANNELS)
        return embedder(freq.to(embedder.linear_1.weight.dtype))

    def forward(self, timestep: Tensor, guidance: Tensor | None, pooled: Tensor, dtype: torch.dtype) -> Tensor:
        temb = self._embed(self.timestep_embedder, timestep, dtype)
        if self.guidance_embedder is not None:  # the model checked that guidance is given exactly then
            temb = temb + self._embed(self.guidance_embedder, guidance, dtype)
        return temb + self.text_embedder(pooled.to(self.text_embedder.linear_1.weight.dtype))


class FluxAttention(nn.Module):
    """q/k/v projections, per-head RMSNorm of q and k, rotary, attention.

    `joint=True` (double-stream blocks): the text stream has its own projections and norms
    (`add_*_proj`, `norm_added_*`) and output (`to_add_out`); both streams attend together.
    `joint=False` (single-stream blocks): one stream, no output projection (the block's
    `proj_out` mixes attention and MLP).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, joint: bool, selector: AttentionSelector) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.norm_q = nn.RMSNorm(head_dim, eps=_EPS)
        self.norm_k = nn.RMSNorm(head_dim, eps=_EPS)
        if joint:
            self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # diffusers' to_out.1 is a dropout
            self.add_q_proj = nn.Linear(dim, inner)
            self.add_k_proj = nn.Linear(dim, inner)
            self.add_v_proj = nn.Linear(dim, inner)
            self.norm_added_q = nn.RMSNorm(head_dim, eps=_EPS)
            self.norm_added_k = nn.RMSNorm(head_dim, eps=_EPS)
            self.to_add_out = nn.Linear(inner, dim)
        self.attention = Attention(selector=selector, scale=None)
        self.sequence_parallel: UlyssesAttention | RingAttention | HybridAttention | None = None  # `enable_sequence_parallel`

    def _qkv(self, x: Tensor, added: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Heads-split q, k, v `[..., N, H, D]` of one stream, q and k normalised."""
        if added:
            projs, norms = (self.add_q_proj, self.add_k_proj, self.add_v_proj), (self.norm_added_q, self.norm_added_k)
        else:
            projs, norms = (self.to_q, self.to_k, self.to_v), (self.norm_q, self.norm_k)
        q, k, v = (proj(x).unflatten(-1, (self.heads, -1)) for proj in projs)
        return norms[0](q), norms[1](k), v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout) -> Tensor:
        """Attention over the joint sequence (q and k rotated); `[B, N, H * D]` in q's dtype.

        The attention call is a graph break, and without dynamo's nested graph breaks every caller's
        frame ends its graph at its call into here: the rotary is applied by the callers, so that it
        compiles into one kernel with the q/k norms before it."""
        metadata = layout.metadata
        if layout.sequence_split is not None:
            out = self._attend_split(q, k, v, layout.sequence_split, layout.text_tokens)
        elif metadata is not None and metadata.packed:
            out = self.attention(q[0], k[0], v[0], metadata).unsqueeze(0)
        else:
            out = self.attention(q, k, v, metadata)
        return out.flatten(-2).to(q.dtype)

    def _attend_split(self, q: Tensor, k: Tensor, v: Tensor, split: SequenceSplit | HybridSplit,
                      text_tokens: int) -> Tensor:
        """Sequence parallel: `[whole text; local image]` q/k/v `[1 or B, L + local, H, D]` -> the
        whole text's output (the same on every rank) and this rank's image output, joined alike."""
        if self.sequence_parallel is None:
            raise RuntimeError("a sequence-split forward reached an attention layer without sequence parallelism; "
                               "call FluxTransformer2DModel.enable_sequence_parallel(group) on the model")
        txt_qkv, img_qkv = zip(*((x[:, :text_tokens], x[:, text_tokens:]) for x in (q, k, v)))
        if split.packed:  # the split describes [tokens, H, D]
            txt_out, img_out = self.sequence_parallel.forward_joint(*(x[0] for x in txt_qkv),
                                                                    *(x[0] for x in img_qkv), split)
            return torch.cat([txt_out, img_out])[None]
        txt_out, img_out = self.sequence_parallel.forward_joint(*txt_qkv, *img_qkv, split)
        return torch.cat([txt_out, img_out], dim=1)

    def forward(self, x: Tensor, rotary: Rotary, layout: TokenLayout) -> Tensor:
        """Single stream: x `[B, N, dim]` (the joint sequence) -> attention output `[B, N, inner]`."""
        q, k, v = self._qkv(x, added=False)
        return self._attend(_rotate(q, rotary), _rotate(k, rotary), v, layout)

    def forward_joint(self, img: Tensor, txt: Tensor, rotary: Rotary, layout: TokenLayout) -> tuple[Tensor, Tensor]:
        """Double stream: image `[B, S, dim]` and text `[B, L, dim]` -> their attention outputs."""
        img_qkv, txt_qkv = self._qkv(img, added=False), self._qkv(txt, added=True)
        q, k, v = (layout.join(t, i) for t, i in zip(txt_qkv, img_qkv))
        txt_out, img_out = layout.split(self._attend(_rotate(q, rotary), _rotate(k, rotary), v, layout), txt.shape[1])
        return self.to_out[0](img_out), self.to_add_out(txt_out)


def _linear_gelu(x: Tensor, linear: nn.Linear) -> Tensor:
    """tanh-GELU(linear(x)); the fused op at inference (no backward), plain ops when training or FP8."""
    if torch.is_grad_enabled() or type(linear) is not nn.Linear:
        return F.gelu(linear(x), approximate="tanh")
    return linear_gelu_tanh(x, linear.weight, linear.bias)


class FluxTransformerBlock(nn.Module):
    """Double stream: each stream modulated by its own AdaLN, joint attention, each its own MLP."""

    def __init__(self, dim: int, heads: int, head_dim: int, selector: AttentionSelector) -> None:
        super().__init__()
        self.norm1 = AdaNorm(dim, 6)
        self.norm1_context = AdaNorm(dim, 6)
        self.attn = FluxAttention(dim, heads, head_dim, joint=True, selector=selector)
        self.ff = FeedForward(dim, 4 * dim)
        self.ff_context = FeedForward(dim, 4 * dim)

    def forward(self, img: Tensor, txt: Tensor, temb: Tensor, rotary: Rotary,
                layout: TokenLayout) -> tuple[Tensor, Tensor]:
        """img `[B, S, dim]`, txt `[B, L, dim]`, temb `[R, dim]` (a row per sample) -> (img, txt)."""
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
        img_rows, txt_rows = layout.img_rows, layout.txt_rows

        img_attn, txt_attn = self.attn.forward_joint(
            _modulate(img, shift, scale, img_rows), _modulate(txt, c_shift, c_scale, txt_rows), rotary, layout
        )
        img = img + _per_token(gate, img_rows) * img_attn
        img = img + _per_token(gate_mlp, img_rows) * self.ff(_modulate(img, shift_mlp, scale_mlp, img_rows))

        txt = txt + _per_token(c_gate, txt_rows) * txt_attn
        txt_mlp = self.ff_context(_modulate(txt, c_shift_mlp, c_scale_mlp, txt_rows))
        txt = txt + _per_token(c_gate_mlp, txt_rows) * txt_mlp
        return _clip_fp16(img), _clip_fp16(txt)


class FluxSingleTransformerBlock(nn.Module):
    """Single stream over the joint sequence: attention and a GELU MLP side by side, one output projection."""

    def __init__(self, dim: int, heads: int, head_dim: int, selector: AttentionSelector) -> None:
        super().__init__()
        self.norm = AdaNorm(dim, 3)
        self.proj_mlp = nn.Linear(dim, 4 * dim)
        self.proj_out = nn.Linear(dim + 4 * dim, dim)
        self.attn = FluxAttention(dim, heads, head_dim, joint=False, selector=selector)

    def forward(self, x: Tensor, temb: Tensor, rotary: Rotary, layout: TokenLayout) -> Tensor:
        """x `[B, N, dim]` (joint sequence), temb `[R, dim]` -> x."""
        shift, scale, gate = self.norm(temb)
        rows = layout.joint_rows
        h = _modulate(x, shift, scale, rows)
        mixed = torch.cat([self.attn(h, rotary, layout), _linear_gelu(h, self.proj_mlp)], dim=-1)
        return _clip_fp16(x + _per_token(gate, rows) * self.proj_out(mixed))


# ----------------------------------------------------------------------------- model


class FluxTransformer2DModel(DiTModel):
    """Flux.1 DiT (dev with `guidance_embeds`, schnell without) with diffusers' parameter names.

    Construct from plain config arguments (like diffusers) or `from_config(config_json_dict)`.
    No buffers: rotary tables are computed per forward from the position ids, so the model
    can be built on the meta device and loaded by assignment.
    """

    # diffusers keeps nothing of Flux in float32 (its `_keep_in_fp32_modules` is None)
    _keep_in_fp32_modules: tuple[str, ...] = ()

    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: Sequence[int] = (16, 56, 56),
        attention_backend: str | None = None,
    ) -> None:
        """Config as plain arguments (diffusers' names). `attention_backend`: a backend name,
        "auto", or None for $DITSERVE_ATTENTION_BACKEND (else "auto")."""
        super().__init__()
        self.config = cfg = FluxTransformerConfig(
            patch_size=patch_size, in_channels=in_channels, out_channels=out_channels, num_layers=num_layers,
            num_single_layers=num_single_layers, attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads, joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim, guidance_embeds=guidance_embeds,
            axes_dims_rope=axes_dims_rope,
        )
        dim, heads, head_dim = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        self.attention_selector = AttentionSelector(attention_backend)
        self.time_text_embed = TimeTextEmbedding(dim, cfg.pooled_projection_dim, cfg.guidance_embeds)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(cfg.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            FluxTransformerBlock(dim, heads, head_dim, self.attention_selector) for _ in range(cfg.num_layers)
        )
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleTransformerBlock(dim, heads, head_dim, self.attention_selector)
            for _ in range(cfg.num_single_layers)
        )
        self.norm_out = AdaNorm(dim, 2)
        # as diffusers: patch_size only widens the output (Flux checkpoints have 1; latents come packed 2x2)
        self.proj_out = nn.Linear(dim, cfg.patch_size * cfg.patch_size * cfg.out_channels)
        self._sequence_parallel: SequenceParallel | None = None  # set by `enable_sequence_parallel`

    @classmethod
    def from_config(cls, config: dict[str, Any], attention_backend: str | None = None) -> FluxTransformer2DModel:
        """Build from a diffusers `transformer/config.json` dict.

        Keys starting with `_` are metadata and skipped; keys diffusers' constructor does not
        know are skipped with a warning (diffusers ignores them too). Bad values raise ValueError.
        """
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict (a parsed config.json), got {type(config).__name__}")
        known = set(FluxTransformerConfig.__dataclass_fields__)
        args = {k: v for k, v in config.items() if k in known}
        ignored = sorted(k for k in config if k not in known and not k.startswith("_"))
        if ignored:
            logger.warning("FluxTransformer2DModel.from_config: ignoring config keys %s", ignored)
        return cls(**args, attention_backend=attention_backend)

    # -- configuration of attention ------------------------------------------------------

    def enable_sequence_parallel(self, layout: SequenceParallel | torch.distributed.ProcessGroup | None = None, *,
                                 ring: bool = False) -> None:
        """Split each sample's image tokens across ranks.

        Text tokens stay whole on every rank (the joint tokens of the wrappers' `forward_joint`),
        image tokens, their rotary angles and conditioning rows are sharded, and the image is
        gathered before the head. Every rank must run the same forward (dense or packed) on the
        same inputs; each returns the whole output. `layout`: a `SequenceParallel` (Ulysses, ring,
        or Ulysses inside ring), or a process group (None: the default group) for Ulysses over
        it, ring with `ring`. Ulysses needs the heads to divide by its degree (checked here).
        """
        layout = as_sequence_parallel(layout, ring)
        layout.check_heads(self.config.num_attention_heads)  # ValueError naming the degrees that work
        self._sequence_parallel = layout
        for module in self.modules():
            if isinstance(module, FluxAttention):
                module.sequence_parallel = layout.attention(module.attention)

    def _sequence_split(self, img_lens: int | Sequence[int],
                        txt_lens: Sequence[int] = ()) -> SequenceSplit | HybridSplit | None:
        """This forward's split of the image tokens: dense (one length, the text whole in front) or
        packed (one image and one text length per sample); None when not sequence parallel."""
        if self._sequence_parallel is None:
            return None
        if isinstance(img_lens, int):
            return self._sequence_parallel.split(img_lens)
        return self._sequence_parallel.split(list(img_lens), self.device, joint_lengths=list(txt_lens))

    def repeated_blocks(self) -> list[nn.Module]:
        """The double- and single-stream blocks (what compiles and what FP8 quantizes)."""
        return [*self.transformer_blocks, *self.single_transformer_blocks]

    # -- shared pieces of both layouts ---------------------------------------------------

    def _blocks(self, img: Tensor, txt: Tensor, temb: Tensor, rotary: Rotary, layout: TokenLayout,
                interrupt: Callable[[], bool] | None) -> Tensor:
        """The double-stream blocks, then the single-stream ones on the joined sequence; returns
        the image tokens. `interrupt()` is asked between blocks (both kinds) and
        `StepInterrupted` stops the forward when it says so."""
        total = len(self.transformer_blocks) + len(self.single_transformer_blocks)

        def check(index: int) -> None:
            if interrupt is not None and index and interrupt():
                raise StepInterrupted(index, total)

        for index, block in enumerate(self.transformer_blocks):
            check(index)
            img, txt = block(img, txt, temb, rotary, layout)
        x = layout.join(txt, img)
        for index, block in enumerate(self.single_transformer_blocks, start=len(self.transformer_blocks)):
            check(index)
            x = block(x, temb, rotary, layout)
        return layout.split(x, txt.shape[1])[1]

    def _split_blocks(self, split: SequenceSplit | HybridSplit, img: Tensor, txt: Tensor, temb: Tensor, rotary: Rotary,
                      txt_rows: Tensor | None, img_rows: Tensor | None,
                      interrupt: Callable[[], bool] | None) -> Tensor:
        """`_blocks` with the image tokens split across the sequence group; returns them whole.

        img `[B or 1, S, dim]` (whole), txt `[B or 1, L, dim]`, rotary `[L + S, D/2]` in the
        order `cat([txt, img])`, rows `[1, L]` / `[1, S]` (packed) or None (dense). This rank
        keeps its slice of the image tokens and of their rotary angles and rows (padding zero).
        """
        text = txt.shape[1]

        def shard(x: Tensor) -> Tensor:  # `[B or 1, S, ...]` whole -> `[B or 1, local, ...]`
            return split.shard(x[0])[None] if split.packed else split.shard(x)

        local_rotary = tuple(torch.cat([r[:text], shard(r[None, text:])[0]]) for r in rotary)
        layout = TokenLayout.parallel(split, text, txt_rows, None if img_rows is None else shard(img_rows))
        img = self._blocks(shard(img), txt, temb, local_rotary, layout, interrupt)
        if split.packed:
            return self._sequence_parallel.gather(split, img[0])[None]
        return self._sequence_parallel.gather(split, img)

    def _head(self, img: Tensor, temb: Tensor, rows: Tensor | None) -> Tensor:
        """Output AdaLN (scale before shift, as diffusers' `AdaLayerNormContinuous`) and projection."""
        scale, shift = self.norm_out(temb.to(img.dtype))
        return self.proj_out(_modulate(img, shift, scale, rows))

    def _embed(self, latents: Tensor, text: Tensor, timestep: Tensor, guidance: Tensor | None,
               pooled: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Image tokens, text tokens (model width, model dtype) and the conditioning rows `[N, dim]`."""
        img = self.x_embedder(latents.to(self.x_embedder.weight.dtype))
        temb = self.time_text_embed(timestep, guidance, pooled, img.dtype)
        txt = self.context_embedder(text.to(self.context_embedder.weight.dtype))
        return img, txt, temb

    def _check_ids(self, ids: Tensor, tokens: int, what: str) -> None:
        axes = len(self.config.axes_dims_rope)
        if ids.ndim != 2 or tuple(ids.shape) != (tokens, axes):
            raise ValueError(f"{what} must be [{tokens}, {axes}] (one position per token), got {tuple(ids.shape)}")

    def _check_width(self, x: Tensor, width: int, name: str, what: str) -> None:
        if x.shape[-1] != width or x.shape[-2] < 1:
            raise ValueError(f"{what} must be [..., tokens >= 1, {name}={width}], got {tuple(x.shape)}")

    def _check_guidance(self, given: bool, what: str) -> None:
        if given != self.config.guidance_embeds:
            raise ValueError(
                f"{what}: this transformer has guidance_embeds={self.config.guidance_embeds} "
                f"({'dev: guidance is required' if self.config.guidance_embeds else 'schnell: guidance must be None'})"
            )

    # -- dense: B samples of one shape ---------------------------------------------------

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        pooled_projections: Tensor,
        timestep: Tensor,
        img_ids: Tensor,
        txt_ids: Tensor,
        guidance: Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = False,
        interrupt: Callable[[], bool] | None = None,
    ) -> tuple[Tensor] | FluxTransformerOutput:
        """diffusers-compatible call: packed latents `[B, S, in_channels]`, text `[B, L, joint_attention_dim]`,
        pooled `[B, pooled_projection_dim]`, timestep `[B]` (t / 1000, or one value for all), position
        ids `img_ids [S, axes]` / `txt_ids [L, axes]` shared by the batch, guidance `[B]` (dev) or None
        (schnell) -> `(noise_pred [B, S, patch_size**2 * out_channels],)`.

        Attention runs dense (`[B, L + S, H, D]`, no metadata). `interrupt`: asked between blocks;
        True stops the forward with `StepInterrupted`. Sequence parallel: the S image tokens are
        split across the group (the text whole on every rank) and every rank returns the whole output.
        """
        cfg = self.config
        if joint_attention_kwargs:
            raise ValueError(f"joint_attention_kwargs are not supported (got {sorted(joint_attention_kwargs)})")
        if hidden_states.ndim != 3:
            raise ValueError(f"hidden_states must be [B, S, in_channels], got {tuple(hidden_states.shape)}")
        batch, tokens = hidden_states.shape[:2]
        self._check_width(hidden_states, cfg.in_channels, "in_channels", "hidden_states")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch:
            raise ValueError(f"encoder_hidden_states must be [B={batch}, L, joint_attention_dim], "
                             f"got {tuple(encoder_hidden_states.shape)}")
        self._check_width(encoder_hidden_states, cfg.joint_attention_dim, "joint_attention_dim",
                          "encoder_hidden_states")
        if tuple(pooled_projections.shape) != (batch, cfg.pooled_projection_dim):
            raise ValueError(f"pooled_projections must be [B={batch}, pooled_projection_dim="
                             f"{cfg.pooled_projection_dim}], got {tuple(pooled_projections.shape)}")
        self._check_ids(img_ids, tokens, "img_ids")
        self._check_ids(txt_ids, encoder_hidden_states.shape[1], "txt_ids")
        self._check_guidance(guidance is not None, "forward")
        timestep = self._per_sample(timestep, batch, "timestep", hidden_states.device)
        if guidance is not None:
            guidance = self._per_sample(guidance, batch, "guidance", hidden_states.device)

        img, txt, temb = self._embed(hidden_states, encoder_hidden_states, timestep, guidance, pooled_projections)
        rotary = flux_rotary_cos_sin(torch.cat([txt_ids, img_ids]).to(img.device), cfg.axes_dims_rope)
        split = self._sequence_split(tokens)
        if split is None:
            img = self._blocks(img, txt, temb, rotary, TokenLayout(), interrupt)
        else:
            img = self._split_blocks(split, img, txt, temb, rotary, None, None, interrupt)
        out = self._head(img, temb, None)
        return FluxTransformerOutput(out) if return_dict else (out,)

    @staticmethod
    def _per_sample(values: Tensor | float, batch: int, name: str, device: torch.device) -> Tensor:
        """A scalar or `[B]` -> `[B]`."""
        values = torch.as_tensor(values, device=device)
        if values.ndim > 1 or values.numel() not in (1, batch):
            raise ValueError(f"{name} must be one value or [B={batch}], got shape {tuple(values.shape)}")
        return values.reshape(-1).expand(batch)

    # -- packed: samples of different sizes in one forward -------------------------------

    def _check_sample(self, i: int, s: FluxSample) -> None:
        cfg = self.config
        for name, x in (("latents", s.latents), ("text", s.text)):
            if x.ndim != 2:
                raise ValueError(f"samples[{i}].{name} must be [tokens, channels], got {tuple(x.shape)}")
        self._check_width(s.latents, cfg.in_channels, "in_channels", f"samples[{i}].latents")
        self._check_width(s.text, cfg.joint_attention_dim, "joint_attention_dim", f"samples[{i}].text")
        if tuple(s.pooled.shape) != (cfg.pooled_projection_dim,):
            raise ValueError(f"samples[{i}].pooled must be [pooled_projection_dim={cfg.pooled_projection_dim}], "
                             f"got {tuple(s.pooled.shape)}")
        if s.timestep.numel() != 1:
            raise ValueError(f"samples[{i}].timestep must be one value, got shape {tuple(s.timestep.shape)}")
        if s.guidance is not None and s.guidance.numel() != 1:
            raise ValueError(f"samples[{i}].guidance must be one value or None, got shape {tuple(s.guidance.shape)}")
        self._check_guidance(s.guidance is not None, f"samples[{i}]")
        self._check_ids(s.img_ids, s.latents.shape[0], f"samples[{i}].img_ids")
        self._check_ids(s.txt_ids, s.text.shape[0], f"samples[{i}].txt_ids")

    @staticmethod
    def _stackable(samples: Sequence[FluxSample]) -> bool:
        """True when the dense layout can run them: same shapes and the same position ids."""
        first = samples[0]
        return all(
            s.latents.shape == first.latents.shape and s.text.shape == first.text.shape
            and torch.equal(s.img_ids, first.img_ids) and torch.equal(s.txt_ids, first.txt_ids)
            for s in samples[1:]
        )

    def forward_packed(self, samples: Sequence[FluxSample],
                       interrupt: Callable[[], bool] | None = None) -> list[Tensor]:
        """One forward over samples of different sizes -> noise predictions `[S_img_i, patch_size**2 * out_channels]`.

        Each sample's text and image tokens attend to each other only: the joint sequence is
        packed (`[T, H, D]`, cu_seqlens of L_i + S_i) and the conditioning rows reach tokens
        through one per-token index. If all samples share shapes and position ids this is the
        dense `forward` on the stacked batch (same math, the faster layout). `interrupt`: as
        `forward`'s. Sequence parallel: each sample's image tokens are split across the group on
        their own (`split_packed`, its text the joint tokens), so every rank holds a slice of each.
        """
        samples = list(samples)
        if not samples:
            raise ValueError("forward_packed needs at least one sample")
        for i, s in enumerate(samples):
            if not isinstance(s, FluxSample):
                raise TypeError(f"samples[{i}] must be a FluxSample, got {type(s).__name__}")
            self._check_sample(i, s)
        dev = samples[0].latents.device
        timestep = torch.stack([s.timestep.reshape(()).to(dev) for s in samples])
        guidance = (None if samples[0].guidance is None
                    else torch.stack([s.guidance.reshape(()).to(dev) for s in samples]))
        pooled = torch.stack([s.pooled for s in samples])

        if self._stackable(samples):
            (out,) = self.forward(
                torch.stack([s.latents for s in samples]), torch.stack([s.text for s in samples]), pooled, timestep,
                samples[0].img_ids, samples[0].txt_ids, guidance, interrupt=interrupt,
            )
            return list(out.unbind(0))

        txt_lens = [s.text.shape[0] for s in samples]
        img_lens = [s.latents.shape[0] for s in samples]
        img, txt, temb = self._embed(torch.cat([s.latents for s in samples])[None],
                                     torch.cat([s.text for s in samples])[None], timestep, guidance, pooled)
        split = self._sequence_split(img_lens, txt_lens)
        # position ids in the order of cat([txt, img]): all the text (sample by sample), then all the image tokens
        ids = torch.cat([s.txt_ids for s in samples] + [s.img_ids for s in samples]).to(img.device)
        if split is None:
            layout = TokenLayout.packed(txt_lens, img_lens, dev)
            rotary = flux_rotary_cos_sin(ids[layout.order], self.config.axes_dims_rope)  # in the joint order
            img = self._blocks(img, txt, temb, rotary, layout, interrupt)
            img_rows = layout.img_rows
        else:  # the sequence split keeps the order of cat([txt, img])
            rotary = flux_rotary_cos_sin(ids, self.config.axes_dims_rope)
            img_rows = token_samples(img_lens, img.device)[None]
            img = self._split_blocks(split, img, txt, temb, rotary, token_samples(txt_lens, img.device)[None], img_rows,
                                     interrupt)
        return list(self._head(img, temb, img_rows)[0].split(img_lens))
