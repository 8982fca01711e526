"""Cosmos3 generation model (text to video / image), in one file.

Parameter names and shapes are those of diffusers' `Cosmos3OmniTransformer`, so the published
`transformer/` safetensors load with `load_state_dict(strict=True)`. The math is diffusers' op
for op in the model dtype (norms in float32 as its RMSNorms, the time MLP in float32, rotary
tables rounded to the model dtype), so float32 outputs agree to rounding.

Cosmos3 is a mixture-of-transformers: every layer holds two towers with their own weights,
  understanding  the text tokens, causal self-attention (a language model's layer);
  generation     the vision tokens, attending to [text K/V of this layer ; vision K/V].
The text tower never looks at the vision tokens, so its per-layer K/V (the keys as the
generation tower reads them: normed and rotated) depend on the prompt alone. diffusers runs both
towers at every step; here `encode_text` runs the text tower once per prompt and returns its
K/V (`TextKV`), and each step runs only the generation tower over the vision tokens
(`forward_packed`). The last layer's text attention and MLP are skipped (only its K/V are read).

Attention is grouped-query (fewer K/V heads than query heads) through `ditserve.attention`, with
metadata built once per forward:
  dense   B samples of one shape (one text length): queries `[B, S, H, D]`, keys `[B, L + S, Hkv, D]`,
          no metadata;
  packed  samples of different sizes and text lengths: queries `[T, H, D]` (each sample's vision
          tokens), keys `[sum(L_i + S_i), Hkv, D]` (each sample's text then vision K/V), ragged
          cu_seqlens for q and for kv, so a sample sees only its own text and vision tokens.

Sequence parallelism (`enable_sequence_parallel`: Ulysses, ring or Ulysses inside ring): each
sample's vision tokens are split across the ranks of a group, with their mRoPE angles; the
prompt's K/V, whole on every rank, are the wrappers' key-only joint tokens
(`forward_joint_keys`: no text query runs in a step). The time embedding is added before the
split, so no per-token row follows the tokens. The tokens are gathered after the output head (a
per-token norm and projection: `patch_latent_dim` features to exchange instead of `hidden_size`),
and every rank returns the whole prediction.

Positions are 3D mRoPE (time, height, width) interleaved over the rotary frequencies, with the
time axis scaled by the video's fps (`vision_position_ids`); the rotary is rotate-half, applied
after a per-head RMSNorm of q and k. That norm + rotary is a natural fused kernel (one token's
head rows in registers, as `kernels/qk_norm_rotary.py` does for Wan's across-heads norm and
interleaved pairs); it is left to measurement.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
from ditserve.models.common import DiTModel
from ditserve.models.wan import MLP, timestep_embedding
from ditserve.transfer import to_device, token_samples

__all__ = ["Cosmos3OmniTransformer", "Cosmos3Output", "Cosmos3Sample", "Cosmos3TransformerConfig", "TextKV",
           "mrope_cos_sin", "text_position_ids", "vision_position_ids"]

logger = logging.getLogger(__name__)

Rotary = tuple[Tensor, Tensor]  # cos, sin: [tokens, head_dim] in the model dtype (rotate-half layout)
Grid = tuple[int, int, int]  # (frames, height, width) in patches

_TIME_CHANNELS = 256  # sinusoidal width of the timestep embedding
_DEFAULT_MROPE = (24, 20, 20)  # Qwen3-VL's mrope_section: frequencies per (time, height, width)


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Cosmos3TransformerConfig:
    """The transformer's shape; field names are the keys of diffusers' `transformer/config.json`."""

    attention_bias: bool = False
    attention_dropout: float = 0.0
    head_dim: int = 128
    hidden_size: int = 4096
    intermediate_size: int = 12288
    base_fps: int = 24
    enable_fps_modulation: bool = True
    latent_channel: int = 48
    unified_3d_mrope_reset_spatial_ids: bool = True
    unified_3d_mrope_temporal_modality_margin: int = 15000
    latent_patch_size: int = 2
    num_attention_heads: int = 32
    num_hidden_layers: int = 36
    num_key_value_heads: int = 8
    patch_latent_dim: int = 192
    rms_norm_eps: float = 1e-6
    rope_scaling: Mapping[str, Any] | None = None
    rope_theta: float = 5_000_000.0
    action_dim: int | None = None
    action_gen: bool = False
    num_embodiment_domains: int = 32
    sound_dim: int | None = None
    sound_gen: bool = False
    sound_latent_fps: float = 25.0
    timestep_scale: float = 0.001
    vocab_size: int = 151936
    hidden_act: str = "silu"
    qk_norm_for_text: bool = True
    use_und_k_norm_for_gen: bool = False
    rope_axes_dim: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        axes = self.rope_axes_dim
        if axes is None:  # diffusers: rope_scaling's mrope_section, else Qwen3-VL's
            axes = (self.rope_scaling or {}).get("mrope_section", _DEFAULT_MROPE)
        if not isinstance(axes, list | tuple) or len(axes) != 3 or any(
                not isinstance(a, int) or isinstance(a, bool) or a < 0 for a in axes):
            raise ValueError(f"rope_axes_dim must be three ints >= 0 (time, height, width), got {axes!r}")
        set_(self, "rope_axes_dim", tuple(axes))
        for name in ("head_dim", "hidden_size", "intermediate_size", "latent_channel", "latent_patch_size",
                     "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "patch_latent_dim",
                     "vocab_size", "base_fps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_act not in ("silu", "relu2"):
            raise ValueError(f"hidden_act must be 'silu' (Qwen3 backbone) or 'relu2' (Nemotron), got {self.hidden_act!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (rotate-half rotary), got {self.head_dim}")
        if self.patch_latent_dim != self.latent_patch_size ** 2 * self.latent_channel:
            raise ValueError(f"patch_latent_dim={self.patch_latent_dim} must be latent_patch_size**2 x latent_channel "
                             f"= {self.latent_patch_size ** 2 * self.latent_channel}")
        if self.action_gen and self.action_dim is None:
            raise ValueError("action_gen=true needs action_dim")
        if self.sound_gen and self.sound_dim is None:
            raise ValueError("sound_gen=true needs sound_dim")

    @property
    def nemotron(self) -> bool:
        """The Nemotron backbone (relu2 MLPs) uses Nemotron's RMSNorm rounding everywhere."""
        return self.hidden_act == "relu2"


@dataclass
class Cosmos3Output:
    """What `forward(..., return_dict=True)` returns (diffusers' `Cosmos3OmniTransformerOutput` shape)."""

    sample: list[Tensor]
    sound: list[Tensor] | None = None
    action: list[Tensor] | None = None


@dataclass(frozen=True)
class TextKV:
    """A prompt through the understanding tower: per layer, the K/V the generation tower attends to.

    keys: `[layers, L, Hkv, D]`, normed and rotated as the generation tower reads them; values:
    `[layers, L, Hkv, D]`. Both in the model dtype, on its device. Kept per request for all steps.
    """

    keys: Tensor
    values: Tensor

    @property
    def length(self) -> int:
        return self.keys.shape[1]


@dataclass(frozen=True)
class Cosmos3Sample:
    """One sample of a packed forward: a video's (or image's) latents and its prompt's `TextKV`."""

    latents: Tensor  # [C, T, H, W] (any float dtype; cast to the model's)
    timestep: Tensor  # 0-d: the scheduler's timestep (the model scales it by timestep_scale)
    text: TextKV
    positions: Tensor  # [3, S] mRoPE positions of its vision tokens (`vision_position_ids`)


# ----------------------------------------------------------------------------- positions and rotary


def text_position_ids(length: int) -> Tensor:
    """`[3, L]` float32: text tokens share one position on all three axes, 0..L-1 (diffusers)."""
    return torch.arange(length, dtype=torch.float32).unsqueeze(0).expand(3, -1)


def vision_position_ids(grid: Grid, text_length: int, fps: float | None, config: Cosmos3TransformerConfig,
                        temporal_compression: int) -> Tensor:
    """`[3, T*H*W]` float32 mRoPE positions of a patch grid that follows a prompt of `text_length` tokens.

    Time starts `unified_3d_mrope_temporal_modality_margin` after the text; with fps modulation
    (a video, `enable_fps_modulation`, fps given) a latent frame advances time by
    `base_fps / fps` positions, so clips of any frame rate share one time scale. Height and width
    restart at 0 (`unified_3d_mrope_reset_spatial_ids`) or start at the same offset. Computed on the
    CPU in diffusers' order of operations (the positions are not integers under modulation).
    """
    frames, height, width = grid
    offset = text_length + config.unified_3d_mrope_temporal_modality_margin
    per_frame = height * width
    if fps is not None and config.enable_fps_modulation and frames > 1:
        tokens_per_s = fps / temporal_compression
        base_tokens_per_s = float(config.base_fps) / temporal_compression
        scaled = (torch.arange(frames, dtype=torch.float32) + 0) / tokens_per_s * base_tokens_per_s + offset
        t_index = scaled.view(-1, 1).expand(-1, per_frame).flatten()
    else:
        t_index = torch.arange(frames).view(-1, 1).expand(-1, per_frame).flatten() + int(offset)
    h_index = torch.arange(height).view(1, -1, 1).expand(frames, -1, width).flatten()
    w_index = torch.arange(width).view(1, 1, -1).expand(frames, height, -1).flatten()
    if not config.unified_3d_mrope_reset_spatial_ids:
        h_index, w_index = h_index + int(offset), w_index + int(offset)
    return torch.stack([t_index.float(), h_index.float(), w_index.float()])


def _mrope_axes(head_dim: int, axes_dim: Sequence[int]) -> Tensor:
    """Which position axis drives each rotary frequency: time, except every third frequency from 1
    (height) and from 2 (width) within their sections (Qwen3-VL's interleaved mRoPE)."""
    axis = torch.zeros(head_dim // 2, dtype=torch.long)
    axis[1:axes_dim[1] * 3:3] = 1
    axis[2:axes_dim[2] * 3:3] = 2
    return axis


def mrope_cos_sin(positions: Tensor, head_dim: int, theta: float, axes_dim: Sequence[int],
                  dtype: torch.dtype) -> Rotary:
    """cos/sin `[N, head_dim]` in `dtype` for positions `[3, N]` (float32, on the target device).

    Frequencies as diffusers' buffer (float32, built on the CPU); angles = position x frequency
    in float32 (one rounding, as its K=1 matmul); cos/sin taken in float32, then rounded.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    axis = to_device(_mrope_axes(head_dim, axes_dim), positions.device)
    angles = positions.float()[axis].transpose(0, 1) * to_device(inv_freq, positions.device)  # [N, D/2]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: Tensor, rotary: Rotary) -> Tensor:
    """Rotate-half rotary on `[..., N, heads, D]` with cos/sin `[N, D]`, in x's dtype (as diffusers)."""
    cos, sin = rotary[0].unsqueeze(-2), rotary[1].unsqueeze(-2)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """RMSNorm with a weight, in either backbone's rounding.

    Qwen3 (diffusers' RMSNorm): normalise in float32, round to a half-precision weight's dtype,
    then multiply. Nemotron: the weight multiplies in float32, one rounding at the end.
    """

    def __init__(self, dim: int, eps: float, nemotron: bool) -> None:
        super().__init__()
        self.eps = eps
        self.nemotron = nemotron
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.nemotron:
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return (self.weight.float() * xf).to(x.dtype)
        y = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(self.weight.dtype)
        return y * self.weight


class FeedForward(nn.Module):
    """SwiGLU (`down(silu(gate(x)) * up(x))`, Qwen3) or squared ReLU (`down(relu(up(x))^2)`, Nemotron)."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False) if act == "silu" else None
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_proj is None:
            return self.down_proj(torch.relu(self.up_proj(x)).square())
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoTAttention(nn.Module):
    """The projections and norms of both towers (diffusers' `Cosmos3PackedMoTAttention` names) and
    the attention call. Text: to_q/k/v/out (+ norm_q/k on Qwen3, k_norm_und_for_gen on Edge);
    vision: add_q/k/v_proj, to_add_out, norm_added_q/k."""

    def __init__(self, cfg: Cosmos3TransformerConfig, selector: AttentionSelector) -> None:
        super().__init__()
        dim, d, heads, kv_heads = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        bias, eps, nemotron = cfg.attention_bias, cfg.rms_norm_eps, cfg.nemotron
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d
        self.to_q = nn.Linear(dim, heads * d, bias=bias)
        self.to_k = nn.Linear(dim, kv_heads * d, bias=bias)
        self.to_v = nn.Linear(dim, kv_heads * d, bias=bias)
        self.to_out = nn.Linear(heads * d, dim, bias=bias)
        self.norm_q = RMSNorm(d, eps, nemotron) if cfg.qk_norm_for_text else None
        self.norm_k = RMSNorm(d, eps, nemotron) if cfg.qk_norm_for_text else None
        separate = cfg.use_und_k_norm_for_gen and not cfg.qk_norm_for_text
        self.k_norm_und_for_gen = RMSNorm(d, eps, nemotron) if separate else None
        self.add_q_proj = nn.Linear(dim, heads * d, bias=bias)
        self.add_k_proj = nn.Linear(dim, kv_heads * d, bias=bias)
        self.add_v_proj = nn.Linear(dim, kv_heads * d, bias=bias)
        self.to_add_out = nn.Linear(heads * d, dim, bias=bias)
        self.norm_added_q = RMSNorm(d, eps, nemotron)
        self.norm_added_k = RMSNorm(d, eps, nemotron)
        self.attention = Attention(selector=selector)
        self.sequence_parallel: UlyssesAttention | RingAttention | HybridAttention | None = None  # `enable_sequence_parallel`

    def split_heads(self, x: Tensor, kv: bool) -> Tensor:
        return x.unflatten(-1, (self.kv_heads if kv else self.heads, self.head_dim))


class DecoderLayer(nn.Module):
    """One layer of both towers. `forward` is the vision tower's step (what a denoising step runs,
    and what `compile_blocks` compiles); `understand` the text tower's (once per prompt)."""

    def __init__(self, cfg: Cosmos3TransformerConfig, selector: AttentionSelector) -> None:
        super().__init__()
        dim, eps, nemotron = cfg.hidden_size, cfg.rms_norm_eps, cfg.nemotron
        self.self_attn = MoTAttention(cfg, selector)
        self.mlp = FeedForward(dim, cfg.intermediate_size, cfg.hidden_act)
        self.mlp_moe_gen = FeedForward(dim, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = RMSNorm(dim, eps, nemotron)
        self.input_layernorm_moe_gen = RMSNorm(dim, eps, nemotron)
        self.post_attention_layernorm = RMSNorm(dim, eps, nemotron)
        self.post_attention_layernorm_moe_gen = RMSNorm(dim, eps, nemotron)

    def understand(self, x: Tensor, rotary: Rotary, metadata: AttentionMetadata,
                   last: bool) -> tuple[Tensor | None, Tensor, Tensor]:
        """Text tokens `[1, L, dim]` (dense) or `[T, dim]` (packed prompts) -> (the next layer's input,
        or None for the last layer; keys as the vision tower reads them; values)."""
        attn = self.self_attn
        h = self.input_layernorm(x)
        q = attn.split_heads(attn.to_q(h), kv=False)
        k = attn.split_heads(attn.to_k(h), kv=True)
        v = attn.split_heads(attn.to_v(h), kv=True)
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.k_norm_und_for_gen is None:
            k = _rotate(k, rotary)
            k_for_gen = k
        else:
            k_for_gen = _rotate(attn.k_norm_und_for_gen(k), rotary)
            k = k if last else _rotate(k, rotary)
        if last:  # the text tower's output after the last layer is never read
            return None, k_for_gen, v
        out = attn.attention(_rotate(q, rotary), k, v, metadata)
        x = x + attn.to_out(out.flatten(-2))
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k_for_gen, v

    def forward(self, x: Tensor, rotary: Rotary, text_k: Tensor, text_v: Tensor, layout: KVLayout) -> Tensor:
        """Vision tokens `[B, S, dim]` (dense) or `[T, dim]` (packed) attending to [text ; vision] K/V."""
        attn = self.self_attn
        h = self.input_layernorm_moe_gen(x)
        q = _rotate(attn.norm_added_q(attn.split_heads(attn.add_q_proj(h), kv=False)), rotary)
        k = _rotate(attn.norm_added_k(attn.split_heads(attn.add_k_proj(h), kv=True)), rotary)
        v = attn.split_heads(attn.add_v_proj(h), kv=True)
        if layout.split is not None:  # this rank's vision tokens; the text K/V whole, keys only
            if attn.sequence_parallel is None:
                raise RuntimeError("a sequence-split forward reached a layer without sequence parallelism; call "
                                   "Cosmos3OmniTransformer.enable_sequence_parallel(layout) on the model")
            out = attn.sequence_parallel.forward_joint_keys(text_k, text_v, q, k, v, layout.split)
        else:
            out = attn.attention(q, layout.join(text_k, k), layout.join(text_v, v), layout.metadata)
        x = x + attn.to_add_out(out.flatten(-2))
        return x + self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(x))


@dataclass(eq=False)  # immutable by convention, not frozen: see AttentionMetadata
class KVLayout:
    """How a forward's keys are laid out: dense (every field None: `cat([text, vision], dim=1)`) or
    packed (each sample's text then vision K/V; `metadata` has ragged cu_seqlens for q and kv).
    With `split` (sequence parallel) the vision tokens are this rank's slice of it, and the
    wrapper lays out the keys itself."""

    metadata: AttentionMetadata | None = None
    text_slots: Tensor | None = None  # where each text token goes in the packed keys
    vision_slots: Tensor | None = None
    total: int = 0
    split: SequenceSplit | HybridSplit | None = None

    @classmethod
    def packed(cls, text_lens: Sequence[int], vision_lens: Sequence[int], device: torch.device) -> KVLayout:
        text_slots, vision_slots, start = [], [], 0
        for text, vision in zip(text_lens, vision_lens):
            text_slots.append(torch.arange(start, start + text))
            vision_slots.append(torch.arange(start + text, start + text + vision))
            start += text + vision
        kv_lens = [t + v for t, v in zip(text_lens, vision_lens)]
        return cls(AttentionMetadata.from_lengths(vision_lens, kv_lens, device=device),
                   to_device(torch.cat(text_slots), device), to_device(torch.cat(vision_slots), device), start)

    def join(self, text: Tensor, vision: Tensor) -> Tensor:
        """Text `[B, L, Hkv, D]` / `[sum L, Hkv, D]` and vision K or V -> the keys attention reads."""
        if self.metadata is None:
            return torch.cat([text, vision], dim=1)
        out = vision.new_empty((self.total, *vision.shape[1:]))
        out.index_copy_(0, self.text_slots, text)
        out.index_copy_(0, self.vision_slots, vision)
        return out


class _DomainLinear(nn.Module):
    """An action head's weights (diffusers' `DomainAwareLinear`: one matrix per embodiment domain).
    Held only so the checkpoint loads; text-to-video never runs it."""

    def __init__(self, in_features: int, out_features: int, domains: int) -> None:
        super().__init__()
        self.fc = nn.Embedding(domains, in_features * out_features)
        self.bias = nn.Embedding(domains, out_features)


# ----------------------------------------------------------------------------- the model


class Cosmos3OmniTransformer(DiTModel):
    """Cosmos3's transformer with diffusers' parameter names, for text-to-video and text-to-image.

    Construct from plain config arguments (like diffusers) or `from_config(config_json_dict)`.
    No buffers (the rotary tables are computed from positions), so it builds on meta. The
    language-model head and the action / sound heads load with the checkpoint but are never run;
    `drop_unused_heads` frees them.
    """

    _keep_in_fp32_modules = ("time_embedder",)

    def __init__(self, attention_backend: str | None = None, **config: Any) -> None:
        """Config as keyword arguments (diffusers' names). `attention_backend`: a backend name,
        "auto", or None for $DITSERVE_ATTENTION_BACKEND (else "auto")."""
        super().__init__()
        self.config = cfg = Cosmos3TransformerConfig(**config)
        dim = cfg.hidden_size
        self.attention_selector = AttentionSelector(attention_backend)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.attention_selector) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(dim, cfg.rms_norm_eps, cfg.nemotron)
        self.norm_moe_gen = RMSNorm(dim, cfg.rms_norm_eps, cfg.nemotron)
        self.lm_head = nn.Linear(dim, cfg.vocab_size, bias=False)
        self.proj_in = nn.Linear(cfg.patch_latent_dim, dim)
        self.proj_out = nn.Linear(dim, cfg.patch_latent_dim)
        self.time_embedder = MLP(_TIME_CHANNELS, dim, approximate_gelu=False)
        if cfg.action_gen:
            self.action_proj_in = _DomainLinear(cfg.action_dim, dim, cfg.num_embodiment_domains)
            self.action_proj_out = _DomainLinear(dim, cfg.action_dim, cfg.num_embodiment_domains)
            self.action_modality_embed = nn.Parameter(torch.zeros(dim))
        if cfg.sound_gen:
            self.audio_proj_in = nn.Linear(cfg.sound_dim, dim)
            self.audio_proj_out = nn.Linear(dim, cfg.sound_dim)
            self.audio_modality_embed = nn.Parameter(torch.zeros(dim))
        self._sequence_parallel: SequenceParallel | None = None  # set by `enable_sequence_parallel`

    @classmethod
    def from_config(cls, config: Mapping[str, Any], attention_backend: str | None = None) -> Cosmos3OmniTransformer:
        """Build from a diffusers `transformer/config.json` dict (keys starting with `_` and the load-time
        `dtype` hint skipped; other unknown keys skipped with a warning, as diffusers does)."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict (a parsed config.json), got {type(config).__name__}")
        known = {f.name for f in fields(Cosmos3TransformerConfig)}
        ignored = sorted(k for k in config if k not in known and not k.startswith("_") and k != "dtype")
        if ignored:
            logger.warning("Cosmos3OmniTransformer.from_config: ignoring config keys %s", ignored)
        return cls(attention_backend=attention_backend, **{k: v for k, v in config.items() if k in known})

    def drop_unused_heads(self) -> None:
        """Free what text-to-video never runs: the language-model head (vocab x hidden, ~1.2 GB in bf16
        at Nano's size) and the action / sound heads. After this `state_dict` no longer matches the
        checkpoint."""
        for name in ("lm_head", "action_proj_in", "action_proj_out", "action_modality_embed", "audio_proj_in",
                     "audio_proj_out", "audio_modality_embed"):
            if hasattr(self, name):
                delattr(self, name)

    def enable_sequence_parallel(self, layout: SequenceParallel | torch.distributed.ProcessGroup | None = None, *,
                                 ring: bool = False) -> None:
        """Split each sample's vision tokens across ranks (the prompt's K/V stay whole on every rank).

        Every rank must run the same forward (dense or packed) on the same inputs; each returns the
        whole output. `layout`: a `SequenceParallel` (Ulysses, ring, or Ulysses inside ring), or a
        process group (None: the default group) for Ulysses over it, ring with `ring`. Ulysses
        needs the query heads to divide by its degree (checked here; K/V heads fewer than the
        degree are replicated); ring takes any head count. The text tower (`encode_text`) is not
        split: it runs once per prompt, whole, on every rank."""
        layout = as_sequence_parallel(layout, ring)
        try:
            layout.check_heads(self.config.num_attention_heads, self.config.num_key_value_heads)
        except ValueError as e:
            raise ValueError(f"{e} (--ulysses-degree / --ring-degree)") from None
        self._sequence_parallel = layout
        for layer in self.layers:
            layer.self_attn.sequence_parallel = layout.attention(layer.self_attn.attention)

    def _split_layout(self, vision_lens: int | Sequence[int], text_lens: Sequence[int] = ()) -> KVLayout | None:
        """This forward's `KVLayout` with the vision tokens split across the sequence ranks: dense (one
        vision length) or packed (a vision and a text length per sample); None when not sequence parallel."""
        layout = self._sequence_parallel
        if layout is None:
            return None
        if isinstance(vision_lens, int):
            return KVLayout(split=layout.split(vision_lens))
        return KVLayout(split=layout.split(list(vision_lens), self.device, joint_lengths=list(text_lens)))

    def repeated_blocks(self) -> list[nn.Module]:
        """The decoder layers: compiled for the vision step (the text tower runs once per prompt)."""
        return list(self.layers)

    # -- text: once per prompt ------------------------------------------------------------

    def encode_text(self, input_ids: Sequence[Tensor], positions: Sequence[Tensor] | None = None) -> list[TextKV]:
        """Prompts (token ids `[L_i]`) through the understanding tower in one forward -> their `TextKV`.

        Causal attention, each prompt on its own (several prompts are packed with ragged
        cu_seqlens). positions: `[3, L_i]` each; default `text_position_ids` (what the pipeline uses).
        """
        input_ids = list(input_ids)
        if not input_ids:
            raise ValueError("encode_text needs at least one prompt")
        lens = [int(ids.numel()) for ids in input_ids]
        if min(lens) < 1:
            raise ValueError(f"every prompt needs at least one token, got lengths {lens}")
        if positions is None:
            positions = [text_position_ids(n) for n in lens]
        positions = [p.expand(3, -1) if p.ndim == 1 else p for p in positions]
        if [tuple(p.shape) for p in positions] != [(3, n) for n in lens]:
            raise ValueError(f"positions must be [3, L] per prompt, got {[tuple(p.shape) for p in positions]}")
        device = self.device
        x = self.embed_tokens(torch.cat([ids.reshape(-1) for ids in input_ids]).to(device))
        rotary = self._rotary(torch.cat(list(positions), dim=1).to(device), x.dtype)
        if len(lens) == 1:
            x, metadata = x[None], AttentionMetadata(causal=True)
        else:
            metadata = AttentionMetadata.from_lengths(lens, device=device, causal=True)
        keys, values = [], []
        for index, layer in enumerate(self.layers):
            x, k, v = layer.understand(x, rotary, metadata, last=index == len(self.layers) - 1)
            keys.append(k.reshape(-1, *k.shape[-2:]))
            values.append(v.reshape(-1, *v.shape[-2:]))
        keys_all, values_all = torch.stack(keys), torch.stack(values)  # [layers, sum L, Hkv, D]
        return [TextKV(k.contiguous(), v.contiguous())
                for k, v in zip(keys_all.split(lens, dim=1), values_all.split(lens, dim=1))]

    # -- shared pieces of both layouts ---------------------------------------------------

    def _rotary(self, positions: Tensor, dtype: torch.dtype) -> Rotary:
        cfg = self.config
        return mrope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_axes_dim, dtype)

    def _grid(self, latent_shape: Sequence[int]) -> Grid:
        """Patch grid of a latent `[C, T, H, W]` (height and width padded up to the patch size)."""
        p = self.config.latent_patch_size
        return latent_shape[1], -(-latent_shape[2] // p), -(-latent_shape[3] // p)

    def _patchify(self, latents: Tensor) -> Tensor:
        """`[..., C, T, H, W]` -> `[..., T*h*w, p*p*C]`, zero-padding H and W to the patch (diffusers)."""
        p = self.config.latent_patch_size
        *lead, c, t, h, w = latents.shape
        hp, wp = -(-h // p), -(-w // p)
        if hp * p != h or wp * p != w:
            latents = F.pad(latents, (0, wp * p - w, 0, hp * p - h))
        x = latents.reshape(*lead, c, t, hp, p, wp, p)
        n = len(lead)
        x = x.permute(*range(n), n + 1, n + 2, n + 4, n + 3, n + 5, n)  # (t, h, w, p, q, c)
        return x.reshape(*lead, t * hp * wp, p * p * c)

    def _unpatchify(self, x: Tensor, latent_shape: Sequence[int]) -> Tensor:
        """`[T*h*w, p*p*C]` -> `[C, T, H, W]`, the padding cut off."""
        p = self.config.latent_patch_size
        c, t, h, w = latent_shape
        hp, wp = -(-h // p), -(-w // p)
        x = x.reshape(t, hp, wp, p, p, c).permute(5, 0, 1, 3, 2, 4).reshape(c, t, hp * p, wp * p)
        return x[:, :, :h, :w]

    def _time_embedding(self, timesteps: Tensor) -> Tensor:
        """Timesteps `[N]` (the scheduler's) -> `[N, dim]` in the model dtype (the MLP in its own dtype)."""
        freq = timestep_embedding(timesteps * self.config.timestep_scale, _TIME_CHANNELS)
        return self.time_embedder(freq.to(self.time_embedder.linear_1.weight.dtype)).to(self.dtype)

    def _generate(self, x: Tensor, rotary: Rotary, keys: Tensor, values: Tensor, layout: KVLayout,
                  interrupt: Callable[[], bool] | None) -> Tensor:
        """The vision tower over every layer, then its output norm and projection to patches.
        `interrupt()` is asked between layers; True stops the forward with `StepInterrupted`.

        x `[B, S, dim]` (dense) or `[T, dim]` (packed) and rotary `[S or T, D]`, whole; with
        `layout.split` this rank runs its slice of them (padding zero) and the output is gathered
        after the head (per token: the fewest features to exchange), whole on every rank."""
        split = layout.split
        if split is not None:
            x = split.shard(x)
            rotary = tuple(split.shard(r) if split.packed else split.shard(r[None])[0] for r in rotary)
        for index, layer in enumerate(self.layers):
            if interrupt is not None and index and interrupt():
                raise StepInterrupted(index, len(self.layers))
            x = layer(x, rotary, keys[index], values[index], layout)
        out = self.proj_out(self.norm_moe_gen(x))
        return out if split is None else self._sequence_parallel.gather(split, out)

    # -- dense: diffusers' signature, one video ------------------------------------------

    def forward(
        self,
        input_ids: Tensor,
        text_indexes: Tensor,
        position_ids: Tensor,
        und_len: int,
        sequence_length: int,
        vision_tokens: Sequence[Tensor],
        vision_token_shapes: Sequence[Sequence[int]],
        vision_sequence_indexes: Tensor,
        vision_mse_loss_indexes: Tensor,
        vision_timesteps: Tensor,
        vision_noisy_frame_indexes: Sequence[Tensor],
        return_dict: bool = True,
        interrupt: Callable[[], bool] | None = None,
        **other_modalities: Any,
    ) -> Cosmos3Output | tuple[list[Tensor], None, None]:
        """diffusers-compatible call for the text-to-video/image case: the prompt's ids (the first
        `und_len` tokens of the joint sequence), one vision item `[1, C, T, H, W]` with every frame
        noisy and its timesteps per token, mRoPE `position_ids [3, sequence_length]`
        -> `([prediction [1, C, T, H, W]], None, None)`.

        Runs both towers (the text one first, as `encode_text`), so its cost is diffusers' step.
        Sound, action and conditioning frames are not supported (NotImplementedError).
        """
        given = sorted(k for k, v in other_modalities.items() if v is not None)
        if given:
            raise NotImplementedError(f"Cosmos3OmniTransformer here is text-to-video/image only; got {given}")
        if len(vision_tokens) != 1 or len(vision_noisy_frame_indexes) != 1:
            raise ValueError(f"forward takes one vision item, got {len(vision_tokens)}")
        latents = vision_tokens[0]
        if latents.ndim == 5:
            latents = latents.squeeze(0)
        if latents.ndim != 4 or latents.shape[0] != self.config.latent_channel:
            raise ValueError(f"vision_tokens[0] must be [1, latent_channel={self.config.latent_channel}, T, H, W], "
                             f"got {tuple(vision_tokens[0].shape)}")
        grid = self._grid(latents.shape)
        tokens = math.prod(grid)
        if len(vision_noisy_frame_indexes[0]) != grid[0]:
            raise NotImplementedError("conditioning frames (image or video input) are not supported: every frame "
                                      "must be noisy")
        if (input_ids.numel(), text_indexes.numel(), vision_sequence_indexes.numel()) != (und_len, und_len, tokens) \
                or sequence_length != und_len + tokens:
            raise ValueError(f"the joint sequence must be the prompt ({und_len} tokens) then the {tokens} vision "
                             f"tokens; got {input_ids.numel()} ids, {vision_sequence_indexes.numel()} vision indexes, "
                             f"sequence_length={sequence_length}")
        if vision_timesteps.numel() != tokens:
            raise ValueError(f"vision_timesteps must hold one value per vision token ({tokens}), "
                             f"got {vision_timesteps.numel()}")
        position_ids = position_ids.expand(3, -1) if position_ids.ndim == 1 else position_ids
        if tuple(position_ids.shape) != (3, sequence_length):
            raise ValueError(f"position_ids must be [3, {sequence_length}], got {tuple(position_ids.shape)}")

        (text,) = self.encode_text([input_ids], [position_ids[:, :und_len]])
        x = self.proj_in(self._patchify(latents.to(self.proj_in.weight.dtype)))
        values, rows = torch.unique(vision_timesteps.reshape(-1), return_inverse=True)
        x = x + self._time_embedding(values)[rows]
        rotary = self._rotary(position_ids[:, und_len:].to(x.device), x.dtype)
        layout = self._split_layout(tokens) or KVLayout()
        out = self._generate(x[None], rotary, text.keys[:, None], text.values[:, None], layout, interrupt)
        preds = [self._unpatchify(out[0], latents.shape)[None]]
        return Cosmos3Output(preds) if return_dict else (preds, None, None)

    # -- packed: samples of different sizes in one forward -------------------------------

    def _check_sample(self, i: int, s: Cosmos3Sample) -> None:
        cfg = self.config
        if s.latents.ndim != 4 or s.latents.shape[0] != cfg.latent_channel:
            raise ValueError(f"samples[{i}].latents must be [latent_channel={cfg.latent_channel}, T, H, W], "
                             f"got {tuple(s.latents.shape)}")
        if s.timestep.numel() != 1:
            raise ValueError(f"samples[{i}].timestep must be one value, got shape {tuple(s.timestep.shape)}")
        tokens = math.prod(self._grid(s.latents.shape))
        if tuple(s.positions.shape) != (3, tokens):
            raise ValueError(f"samples[{i}].positions must be [3, {tokens}], got {tuple(s.positions.shape)}")
        want = (cfg.num_hidden_layers, s.text.length, cfg.num_key_value_heads, cfg.head_dim)
        if tuple(s.text.keys.shape) != want or tuple(s.text.values.shape) != want:
            raise ValueError(f"samples[{i}].text must hold K/V [layers, L, kv_heads, head_dim] = {list(want)}, got "
                             f"{tuple(s.text.keys.shape)} and {tuple(s.text.values.shape)}")

    @staticmethod
    def _stackable(samples: Sequence[Cosmos3Sample]) -> bool:
        """True when the dense layout can run them: same latent shape, text length and positions."""
        first = samples[0]
        return all(
            s.latents.shape == first.latents.shape and s.text.length == first.text.length
            and (s.positions is first.positions or torch.equal(s.positions, first.positions))
            for s in samples[1:]
        )

    def forward_packed(self, samples: Sequence[Cosmos3Sample],
                       interrupt: Callable[[], bool] | None = None) -> list[Tensor]:
        """One vision step over samples of different sizes and prompts -> predictions `[C, T, H, W]`
        (model dtype), one per sample.

        Each sample's vision tokens attend to its own `TextKV` and vision tokens only (packed,
        ragged cu_seqlens for q and kv); its timestep embedding reaches its tokens through one
        per-token row index. Samples of one shape, text length and positions run dense (stacked).
        `interrupt`: asked between layers; True stops the forward with `StepInterrupted`.
        """
        samples = list(samples)
        if not samples:
            raise ValueError("forward_packed needs at least one sample")
        for i, s in enumerate(samples):
            if not isinstance(s, Cosmos3Sample):
                raise TypeError(f"samples[{i}] must be a Cosmos3Sample, got {type(s).__name__}")
            self._check_sample(i, s)
        device, dtype = self.device, self.proj_in.weight.dtype
        timesteps = torch.stack([s.timestep.reshape(()).to(device) for s in samples])
        temb = self._time_embedding(timesteps)  # [N, dim]
        if self._stackable(samples):
            x = self.proj_in(self._patchify(torch.stack([s.latents for s in samples]).to(device, dtype)))
            x = x + temb[:, None]
            rotary = self._rotary(samples[0].positions.to(device), x.dtype)
            keys = torch.stack([s.text.keys for s in samples], dim=1)  # [layers, B, L, Hkv, D]
            values = torch.stack([s.text.values for s in samples], dim=1)
            layout = self._split_layout(x.shape[1]) or KVLayout()
            out = self._generate(x, rotary, keys, values, layout, interrupt)
            return [self._unpatchify(o, s.latents.shape) for o, s in zip(out, samples)]

        vision_lens = [s.positions.shape[1] for s in samples]
        rows = token_samples(vision_lens, device)
        x = self.proj_in(torch.cat([self._patchify(s.latents.to(device, dtype)) for s in samples]))
        x = x + temb[rows]
        rotary = self._rotary(torch.cat([s.positions.to(device) for s in samples], dim=1), x.dtype)
        keys = torch.cat([s.text.keys for s in samples], dim=1)  # [layers, sum L, Hkv, D]
        values = torch.cat([s.text.values for s in samples], dim=1)
        text_lens = [s.text.length for s in samples]
        layout = self._split_layout(vision_lens, text_lens) or KVLayout.packed(text_lens, vision_lens, device)
        out = self._generate(x, rotary, keys, values, layout, interrupt)
        return [self._unpatchify(o, s.latents.shape) for o, s in zip(out.split(vision_lens), samples)]
