"""Wan2.1 / Wan2.2 diffusion transformer (text-to-video), in one file.

Parameter names and shapes are those of diffusers' `WanTransformer3DModel`, so the published
`transformer/` safetensors load with `load_state_dict(strict=True)`. The math follows the
same float32 islands as diffusers (time embedding, modulation, layer norms, rotary), so the
outputs agree to float32 rounding.

One block implementation serves two layouts:
  dense   `forward(...)`        B samples of one shape: tokens [B, S, dim], attention on
                                [B, S, H, D] with no metadata (the fastest path for one request).
  packed  `forward_packed(...)` samples of different sizes: tokens [1, T, dim], attention on
                                [T, H, D] with `AttentionMetadata` (cu_seqlens) built once per
                                forward; per-sample timesteps and rotary grids.
The only difference inside a block is how modulation reaches the tokens (`_per_token`) and
whether attention drops the batch dim (metadata.packed).

Timesteps are one per sample (Wan2.1, Wan2.2 A14B) or one per patch token (Wan2.2 TI2V-5B:
`timestep [B, S]`, the image-conditioned first frame at 0). Either way the time MLP embeds a
small table of distinct timesteps (`[R, 6, dim]` modulation), never one row per token; when
tokens of a sample do not share a row, a per-token row index `[B, S]` (packed: `[1, T]`) picks
each token's row. With one timestep per sample there is no index and no gather.
"""

from __future__ import annotations

import logging
import math
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
from ditserve.kernels.qk_norm_rotary import qk_rms_norm_rotary
from ditserve.models.common import DiTModel
from ditserve.models.fp8 import Float8Linear, quantizable
from ditserve.transfer import token_samples

__all__ = ["WanTransformer3DModel", "WanTransformerConfig", "WanTransformerOutput"]

logger = logging.getLogger(__name__)

Grid = tuple[int, int, int]  # (frames, height, width) in patches
Rotary = tuple[Tensor, Tensor]  # cos, sin: [S or T, head_dim // 2] float32, one row per token


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class WanTransformerConfig:
    """The transformer's shape; field names are the keys of diffusers' `transformer/config.json`."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.out_channels is None:  # diffusers: `out_channels or in_channels`
            set_(self, "out_channels", self.in_channels)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints (t, h, w), got {self.patch_size}")
        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                     "text_dim", "freq_dim", "ffn_dim", "rope_max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.num_layers, int) or self.num_layers < 0:
            raise ValueError(f"num_layers must be an int >= 0, got {self.num_layers!r}")
        if self.attention_head_dim % 2 or self.attention_head_dim < 6:
            # the 3D rotary splits the head into (t, h, w) parts of even size
            raise ValueError(f"attention_head_dim must be even and >= 6 for the 3D rotary, got {self.attention_head_dim}")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {self.freq_dim}")
        if self.qk_norm != "rms_norm_across_heads":
            # diffusers ignores this key and always builds RMSNorm over all heads; a checkpoint
            # that says otherwise was trained with something we do not run.
            raise ValueError(f"qk_norm={self.qk_norm!r} is not supported; only 'rms_norm_across_heads' is")
        if not (isinstance(self.eps, float | int) and self.eps > 0):
            raise ValueError(f"eps must be a positive float, got {self.eps!r}")
        if self.image_dim is not None or self.added_kv_proj_dim is not None or self.pos_embed_seq_len is not None:
            raise NotImplementedError(
                "image-conditioned Wan (I2V / FLF2V: image_dim, added_kv_proj_dim or pos_embed_seq_len set) "
                f"is not implemented; got image_dim={self.image_dim}, added_kv_proj_dim={self.added_kv_proj_dim}, "
                f"pos_embed_seq_len={self.pos_embed_seq_len}. Only text-to-video checkpoints are supported."
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


@dataclass
class WanTransformerOutput:
    """What `forward(..., return_dict=True)` returns (diffusers' `Transformer2DModelOutput` shape)."""

    sample: Tensor


# ----------------------------------------------------------------------------- rotary


def rotary_split(head_dim: int) -> tuple[int, int, int]:
    """How Wan splits a head between the (t, h, w) axes: h and w get 2*(d//6) each, t the rest."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def wan_rotary_cos_sin(head_dim: int, grid: Grid, theta: float = 10000.0) -> Rotary:
    """cos/sin `[F*H*W, head_dim // 2]` (float32, CPU) of the 3D rotary for one patch grid.

    Frequencies and angles in float64 (as diffusers precomputes them), rounded to float32 at
    the end. Half width: entry i rotates the channel pair (2i, 2i+1).
    """
    parts_cos, parts_sin = [], []
    for axis, (dim, n) in enumerate(zip(rotary_split(head_dim), grid)):
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))  # [dim/2]
        angles = torch.outer(torch.arange(n, dtype=torch.float64), inv_freq)  # [n, dim/2]
        shape = [1, 1, 1, dim // 2]
        shape[axis] = n
        angles = angles.view(shape).expand(*grid, dim // 2)
        parts_cos.append(angles.cos().float())
        parts_sin.append(angles.sin().float())
    cos = torch.cat(parts_cos, dim=-1).reshape(-1, head_dim // 2)
    sin = torch.cat(parts_sin, dim=-1).reshape(-1, head_dim // 2)
    return cos, sin


# ----------------------------------------------------------------------------- layers


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (weights too), returned in the input's dtype.

    Callers pass `x.float()` where diffusers does, so the result stays float32 until they
    round it back."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding `[N, dim]` float32, cos half first (flip_sin_to_cos=True, shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t[:, None].float() * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class MLP(nn.Module):
    """linear_1 -> act -> linear_2 (diffusers' TimestepEmbedding and PixArt text projection)."""

    def __init__(self, in_features: int, hidden: int, approximate_gelu: bool) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)
        self.act = nn.GELU(approximate="tanh") if approximate_gelu else nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ConditionEmbedder(nn.Module):
    """Timestep -> (temb [N, dim], 6-way block modulation [N, 6, dim]); text -> model width."""

    def __init__(self, dim: int, freq_dim: int, text_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = MLP(freq_dim, dim, approximate_gelu=False)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = MLP(text_dim, dim, approximate_gelu=True)

    def embed_time(self, timesteps: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        t_freq = timestep_embedding(timesteps, self.freq_dim)
        # time_embedder may be kept in float32 while the rest is bf16 (diffusers' keep-in-fp32)
        temb = self.time_embedder(t_freq.to(self.time_embedder.linear_1.weight.dtype)).to(dtype)
        modulation = self.time_proj(F.silu(temb)).unflatten(1, (6, -1))
        return temb, modulation

    def embed_text(self, text: Tensor) -> Tensor:
        return self.text_embedder(text.to(self.text_embedder.linear_1.weight.dtype))


@torch.library.custom_op("ditserve::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """tanh-GELU(x @ weightᵀ + bias). On CUDA one cuBLASLt call applies the GELU in the
    matmul's epilogue, saving a full read and write of the widest activation (ffn_dim wide).

    A custom op so that torch.compile keeps it whole instead of decomposing it back into a
    matmul plus a separate GELU kernel.
    """
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.is_cuda:
        out = torch._addmm_activation(bias, x2d, weight.t(), use_gelu=True)
    else:
        out = F.gelu(F.linear(x2d, weight, bias), approximate="tanh")
    return out.view(*x.shape[:-1], weight.shape[0])


@linear_gelu_tanh.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class GELUProj(nn.Module):
    """Linear + tanh GELU; a module of its own only so the key reads `ffn.net.0.proj`."""

    def __init__(self, dim: int, inner_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or type(self.proj) is not nn.Linear:  # training (no backward), or FP8
            return F.gelu(self.proj(x), approximate="tanh")
        return linear_gelu_tanh(x, self.proj.weight, self.proj.bias)


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner_dim: int) -> None:
        super().__init__()
        # index 1 is diffusers' (parameterless) dropout; kept so that keys read net.0 / net.2
        self.net = nn.ModuleList([GELUProj(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        out_proj = self.net[2]
        if isinstance(out_proj, Float8Linear):  # the GELU runs inside the FP8 layer's quantizing pass
            return out_proj(self.net[0].proj(x), gelu_first=True)
        return out_proj(self.net[0](x))


class WanAttention(nn.Module):
    """Projections + RMSNorm of q/k over all heads + optional rotary + attention + out proj.

    Self-attention when `context` is None, cross-attention to `context` otherwise. Layout is
    chosen by the metadata: packed metadata means x is `[1, T, dim]` and attention runs on
    `[T, H, D]`; otherwise `[B, S, H, D]`.
    """

    def __init__(self, dim: int, heads: int, eps: float, selector: AttentionSelector) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers' to_out.1 is a dropout
        self.norm_q = nn.RMSNorm(dim, eps=eps, elementwise_affine=True)
        self.norm_k = nn.RMSNorm(dim, eps=eps, elementwise_affine=True)
        self.attention = Attention(selector=selector, scale=None)
        self.sequence_parallel: UlyssesAttention | RingAttention | HybridAttention | None = None  # `enable_sequence_parallel`
        self._qkv: tuple[Tensor, Tensor] | None = None  # set by fuse_qkv
        self.qkv_fp8: Float8Linear | None = None  # set by quantize_fused_qkv

    def fuse_qkv(self) -> None:
        """Project q, k and v with one `[3 * dim, dim]` matrix product (self-attention).

        One wide product runs closer to the GPU's peak than three narrow ones (measured in
        docs/performance.md). `to_q`/`to_k`/`to_v` keep their names
        and become views of the fused weight, so there is no extra memory, `state_dict` keeps
        diffusers' keys and `load_state_dict` writes through to the fused weight. `.to()`
        re-fuses (see `_apply`). Idempotent. Call it after loading: a loader that assigns new parameter
        tensors (rather than copying into them) would bypass the fused weight.
        """
        if self._qkv is not None:
            return
        linears = (self.to_q, self.to_k, self.to_v)
        weight = torch.cat([linear.weight.detach() for linear in linears])
        bias = torch.cat([linear.bias.detach() for linear in linears])
        rows = self.to_q.weight.shape[0]
        for i, linear in enumerate(linears):
            part = slice(i * rows, (i + 1) * rows)
            linear.weight = nn.Parameter(weight[part], requires_grad=False)
            linear.bias = nn.Parameter(bias[part], requires_grad=False)
        self._qkv = (weight, bias)

    def quantize_fused_qkv(self) -> int:
        """The fused q/k/v weight as one FP8 product (1, or 0 when not fused); `to_q`/`to_k`/`to_v`
        (views of it) go, so the bf16 weight is freed."""
        if self._qkv is None or not quantizable(*reversed(self._qkv[0].shape)):
            return 0
        self.qkv_fp8 = Float8Linear(*self._qkv)
        self._qkv = None
        del self.to_q, self.to_k, self.to_v
        return 1

    def _apply(self, fn: Any, recurse: bool = True) -> WanAttention:
        """`.to()` / `.cuda()` / `.half()` convert each parameter on its own, which would leave
        the views of `fuse_qkv` behind: drop the fused weight first and fuse the results again."""
        fused, self._qkv = self._qkv is not None, None
        out = super()._apply(fn, recurse)
        if fused:
            self.fuse_qkv()
        return out

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        rotary: Rotary | None = None,
        metadata: AttentionMetadata | None = None,
    ) -> Tensor:
        kv_in = x if context is None else context
        if rotary is not None:  # self-attention: norms and rotary in one kernel on CUDA
            if self.qkv_fp8 is not None:
                q, k, v = self.qkv_fp8(x).chunk(3, dim=-1)
            elif self._qkv is not None:
                q, k, v = F.linear(x, *self._qkv).chunk(3, dim=-1)
            else:
                q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
            q, k = qk_rms_norm_rotary(q, k, self.norm_q.weight, self.norm_k.weight, *rotary,
                                      float(self.norm_q.eps), self.heads)
        else:
            q = self.norm_q(self.to_q(x)).unflatten(-1, (self.heads, -1))
            k = self.norm_k(self.to_k(kv_in)).unflatten(-1, (self.heads, -1))
            v = self.to_v(kv_in)
        v = v.unflatten(-1, (self.heads, -1))
        if isinstance(metadata, (SequenceSplit, HybridSplit)):  # this rank's slice of a sequence split across ranks
            if metadata.packed:
                out = self.sequence_parallel(q[0], k[0], v[0], metadata).unsqueeze(0)
            else:
                out = self.sequence_parallel(q, k, v, metadata)
            return self.to_out[0](out.flatten(-2).type_as(q))
        if metadata is not None and metadata.packed:
            out = self.attention(q[0], k[0], v[0], metadata).unsqueeze(0)
        else:
            out = self.attention(q, k, v, metadata)
        return self.to_out[0](out.flatten(-2).type_as(q))


def _per_token(values: Tensor, rows: Tensor | None) -> Tensor:
    """Modulation table rows `[R, dim]` laid out to broadcast against tokens `[B, S, dim]`.

    rows None: one row per sample (R == B, or R == 1 for all), so `[R, 1, dim]`: no gather.
    Otherwise `rows[b, s]` is token (b, s)'s row (`[B, S]`; packed: `[1, T]`), so a gather to
    `[B, S, dim]` (torch.compile fuses it into the elementwise op that consumes it).
    """
    return values.unsqueeze(1) if rows is None else values[rows]


def _timestep_table(timesteps: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token timesteps (any shape) -> (distinct values `[R]`, each token's row, same shape).

    The time MLP and modulation then run on R rows (2 for TI2V: 0 and t) instead of one per
    token. `torch.unique` syncs with the host once; embedding every token instead would cost
    a `[tokens, dim] x [dim, 6 * dim]` product, far more than the sync.
    """
    return torch.unique(timesteps, sorted=True, return_inverse=True)


class WanTransformerBlock(nn.Module):
    """adaLN-modulated self-attention (rotary) -> cross-attention to text -> GELU MLP."""

    def __init__(self, dim: int, ffn_dim: int, heads: int, cross_attn_norm: bool, eps: float,
                 selector: AttentionSelector) -> None:
        super().__init__()
        self.eps = eps
        self.attn1 = WanAttention(dim, heads, eps, selector)
        self.attn2 = WanAttention(dim, heads, eps, selector)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else None
        self.ffn = FeedForward(dim, ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def _norm(self, x: Tensor) -> Tensor:
        """norm1 / norm3 of diffusers: affine-free LayerNorm in float32 (returns float32)."""
        return F.layer_norm(x.float(), x.shape[-1:], eps=self.eps)

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        modulation: Tensor,
        rotary: Rotary,
        rows: Tensor | None = None,
        self_metadata: AttentionMetadata | None = None,
        cross_metadata: AttentionMetadata | None = None,
    ) -> Tensor:
        """x `[B, S, dim]`, context `[B, L, dim]`, modulation table `[R, 6, dim]`, and each
        token's row of it (`rows`, see `_per_token`; None: one row per sample)."""
        mod = (self.scale_shift_table + modulation.float()).unbind(1)  # 6 x [R, dim], float32

        def at(i: int) -> Tensor:  # shift, scale, gate, c_shift, c_scale, c_gate; gathered lazily
            return _per_token(mod[i], rows)

        h = (self._norm(x) * (1 + at(1)) + at(0)).type_as(x)
        x = (x.float() + self.attn1(h, None, rotary, self_metadata) * at(2)).type_as(x)

        h = x if self.norm2 is None else self.norm2(x.float()).type_as(x)
        x = x + self.attn2(h, context, None, cross_metadata)

        h = (self._norm(x) * (1 + at(4)) + at(3)).type_as(x)
        x = (x.float() + self.ffn(h).float() * at(5)).type_as(x)
        return x


# ----------------------------------------------------------------------------- model


class WanTransformer3DModel(DiTModel):
    """Wan2.1 text-to-video DiT with diffusers' parameter names.

    Construct from plain config arguments (like diffusers) or `from_config(config_json_dict)`.
    Works on the meta device (no buffers: the rotary tables are computed per patch grid and
    cached on the side, never in the state dict).
    """

    # Modules diffusers keeps in float32 when loading a bf16 model; a loader may do the same
    # (the forward casts at these boundaries, so either choice runs).
    _keep_in_fp32_modules = ["time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]

    def __init__(
        self,
        patch_size: Sequence[int] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int | None = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        attention_backend: str | None = None,
    ) -> None:
        """Config as plain arguments (diffusers' names). `attention_backend`: a backend name,
        "auto", or None for $DITSERVE_ATTENTION_BACKEND (else "auto")."""
        super().__init__()
        self.config = cfg = WanTransformerConfig(
            patch_size=tuple(patch_size), num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim, in_channels=in_channels, out_channels=out_channels,
            text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn_dim, num_layers=num_layers,
            cross_attn_norm=cross_attn_norm, qk_norm=qk_norm, eps=eps, image_dim=image_dim,
            added_kv_proj_dim=added_kv_proj_dim, rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        dim = cfg.inner_dim
        self.attention_selector = AttentionSelector(attention_backend)
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.condition_embedder = ConditionEmbedder(dim, cfg.freq_dim, cfg.text_dim)
        self.blocks = nn.ModuleList(
            WanTransformerBlock(dim, cfg.ffn_dim, cfg.num_attention_heads, cfg.cross_attn_norm, cfg.eps,
                                self.attention_selector)
            for _ in range(cfg.num_layers)
        )
        self.proj_out = nn.Linear(dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self._rotary_cache: dict[tuple[Grid, str], Rotary] = {}

    @classmethod
    def from_config(cls, config: dict[str, Any], attention_backend: str | None = None) -> WanTransformer3DModel:
        """Build from a diffusers `transformer/config.json` dict.

        Keys starting with `_` are metadata and skipped; keys diffusers' constructor does not
        know are skipped with a warning (diffusers ignores them too). Unsupported values raise
        ValueError (NotImplementedError for image-conditioned variants).
        """
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict (a parsed config.json), got {type(config).__name__}")
        known = set(WanTransformerConfig.__dataclass_fields__)
        args = {k: v for k, v in config.items() if k in known}
        ignored = sorted(k for k in config if k not in known and not k.startswith("_"))
        if ignored:
            logger.warning("WanTransformer3DModel.from_config: ignoring config keys %s", ignored)
        if "patch_size" in args and not isinstance(args["patch_size"], list | tuple):
            raise ValueError(f"patch_size must be a list of three ints, got {args['patch_size']!r}")
        return cls(**args, attention_backend=attention_backend)

    # -- configuration of attention ------------------------------------------------------

    def enable_sequence_parallel(self, layout: SequenceParallel | torch.distributed.ProcessGroup | None = None, *,
                                 ring: bool = False) -> None:
        """Split each forward's tokens across ranks (cross-attention needs no exchange: its text is
        whole on every rank). Every rank runs the same forward on the same inputs and returns the
        whole output, dense or packed (each sample of a packed batch split across the ranks).

        `layout`: a `SequenceParallel` (Ulysses, ring, or Ulysses inside ring), or a process group
        (None: the default group) for Ulysses over it, ring with `ring`. Ulysses needs the heads
        to divide by its degree (checked here); ring takes any head count."""
        layout = as_sequence_parallel(layout, ring)
        try:
            layout.check_heads(self.config.num_attention_heads)
        except ValueError as e:
            raise ValueError(f"{e} (--ulysses-degree / --ring-degree)") from None
        self._sequence_parallel = layout
        for block in self.blocks:
            block.attn1.sequence_parallel = layout.attention(block.attn1.attention)

    def _sequence_split(self, tokens: int | Sequence[int]) -> SequenceSplit | HybridSplit | None:
        """This forward's split across the sequence ranks: dense (one length) or packed (one per sample)."""
        layout = getattr(self, "_sequence_parallel", None)
        if layout is None:
            return None
        return layout.split(tokens if isinstance(tokens, int) else list(tokens), self.device)

    def fuse_qkv_projections(self) -> None:
        """`WanAttention.fuse_qkv` in every block's self-attention (after loading weights)."""
        for block in self.blocks:
            block.attn1.fuse_qkv()

    def repeated_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def quantize_fp8(self) -> int:
        """FP8 linear layers in every block, the fused q/k/v product kept as one (FP8) product."""
        fused = sum(block.attn1.quantize_fused_qkv() for block in self.blocks)
        return fused + super().quantize_fp8()

    # -- shared pieces of both layouts ---------------------------------------------------

    def _grid(self, frames: int, height: int, width: int) -> Grid:
        """Patch grid of a latent of this size; sizes must divide by the patch size."""
        pt, ph, pw = self.config.patch_size
        if frames % pt or height % ph or width % pw:
            raise ValueError(
                f"latent (frames, height, width)=({frames}, {height}, {width}) must be divisible by "
                f"patch_size {self.config.patch_size}"
            )
        grid = (frames // pt, height // ph, width // pw)
        if max(grid) > self.config.rope_max_seq_len:
            raise ValueError(f"patch grid {grid} exceeds rope_max_seq_len={self.config.rope_max_seq_len}")
        return grid

    def _rotary(self, grid: Grid, device: torch.device) -> Rotary:
        """cos/sin `[S, D/2]` for one grid, cached per (grid, device)."""
        key = (grid, str(device))
        cached = self._rotary_cache.get(key)
        if cached is None:
            cos, sin = wan_rotary_cos_sin(self.config.attention_head_dim, grid)
            cached = (cos.to(device), sin.to(device))
            if len(self._rotary_cache) >= 64:  # many request sizes: keep it bounded
                self._rotary_cache.clear()
            self._rotary_cache[key] = cached
        return cached

    def _embed_patches(self, latents: Tensor) -> Tensor:
        """`[B, C, F, H, W]` -> tokens `[B, S, dim]` in (f, h, w) order."""
        x = self.patch_embedding(latents.to(self.patch_embedding.weight.dtype))
        return x.flatten(2).transpose(1, 2).contiguous()

    def _blocks(
        self,
        x: Tensor,
        context: Tensor,
        modulation: Tensor,
        rotary: Rotary,
        rows: Tensor | None,
        self_metadata: AttentionMetadata | None,
        cross_metadata: AttentionMetadata | None,
        interrupt: Callable[[], bool] | None = None,
    ) -> Tensor:
        """The blocks in order; `interrupt()` is asked between blocks (a step of a large video can
        take minutes) and `StepInterrupted` stops the forward when it says so."""
        for index, block in enumerate(self.blocks):
            if interrupt is not None and index and interrupt():
                raise StepInterrupted(index, len(self.blocks))
            x = block(x, context, modulation, rotary, rows, self_metadata, cross_metadata)
        return x

    def _head(self, x: Tensor, temb: Tensor, rows: Tensor | None) -> Tensor:
        """Output norm modulated by the temb table `[R, dim]`, then projection to patch pixels `[B, S, p*C]`."""
        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).unbind(1)  # [R, dim] each
        norm = F.layer_norm(x.float(), x.shape[-1:], eps=self.config.eps)
        x = (norm * (1 + _per_token(scale, rows)) + _per_token(shift, rows)).type_as(x)
        return self.proj_out(x)

    def _unpatchify(self, x: Tensor, grid: Grid) -> Tensor:
        """`[B, S, pt*ph*pw*C]` -> `[B, C, F, H, W]`."""
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], -1, f * pt, h * ph, w * pw)

    def _check_latent(self, shape: Sequence[int], what: str) -> None:
        if shape[0] != self.config.in_channels:
            raise ValueError(f"{what} has {shape[0]} channels, the model takes in_channels={self.config.in_channels}")

    def _check_text(self, text: Tensor, what: str) -> None:
        if text.shape[-1] != self.config.text_dim or text.shape[-2] < 1:
            raise ValueError(
                f"{what} must be [..., L >= 1, text_dim={self.config.text_dim}], got {tuple(text.shape)}"
            )

    # -- dense: B samples of one shape ---------------------------------------------------

    @staticmethod
    def _dense_timesteps(timestep: Tensor | float, batch: int, tokens: int,
                         device: torch.device) -> tuple[Tensor, Tensor | None]:
        """`forward`'s timestep -> (timestep table `[R]`, each token's row `[B, S]` or None).

        None (no gather) when every token of a sample shares its timestep: a scalar, `[B]`, or
        `[B, S]` holding one value only.
        """
        timestep = torch.as_tensor(timestep, device=device)
        if timestep.ndim == 2:
            if tuple(timestep.shape) != (batch, tokens):
                raise ValueError(f"per-token timestep must be [B={batch}, S={tokens}] (one per patch token), "
                                 f"got {tuple(timestep.shape)}")
            table, rows = _timestep_table(timestep)
            return (table, None) if table.numel() == 1 else (table, rows)
        if timestep.ndim > 2:
            raise ValueError(f"timestep must be a scalar, [B] or [B, S], got {tuple(timestep.shape)}")
        timestep = timestep.reshape(-1)
        if timestep.numel() not in (1, batch):
            raise ValueError(f"timestep must hold 1 or B={batch} values, got {timestep.numel()}")
        return timestep, None

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor,
        encoder_hidden_states_image: Tensor | None = None,
        return_dict: bool = False,
        attention_kwargs: dict[str, Any] | None = None,
        interrupt: Callable[[], bool] | None = None,
    ) -> tuple[Tensor] | WanTransformerOutput:
        """diffusers-compatible call: latents `[B, C, F, H, W]`, timestep `[B]` (or one for all, or
        `[B, S]`: one per patch token in (f, h, w) order, as Wan2.2 TI2V passes it), text
        `[B, L, text_dim]` -> `(noise_pred [B, C_out, F, H, W],)`.

        Attention runs dense (`[B, S, H, D]`, no metadata): the fastest layout for one request.
        `interrupt`: asked between blocks; True stops the forward with `StepInterrupted`.
        """
        if encoder_hidden_states_image is not None:
            raise NotImplementedError("image conditioning (encoder_hidden_states_image) is not implemented")
        if attention_kwargs:
            raise ValueError(f"attention_kwargs are not supported (got {sorted(attention_kwargs)})")
        if hidden_states.ndim != 5:
            raise ValueError(f"hidden_states must be [B, C, F, H, W], got {tuple(hidden_states.shape)}")
        batch = hidden_states.shape[0]
        self._check_latent(hidden_states.shape[1:], "hidden_states")
        grid = self._grid(*hidden_states.shape[2:])
        timestep, rows = self._dense_timesteps(timestep, batch, math.prod(grid), hidden_states.device)
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch:
            raise ValueError(f"encoder_hidden_states must be [B={batch}, L, text_dim], got {tuple(encoder_hidden_states.shape)}")
        self._check_text(encoder_hidden_states, "encoder_hidden_states")

        x = self._embed_patches(hidden_states)
        temb, modulation = self.condition_embedder.embed_time(timestep, x.dtype)
        context = self.condition_embedder.embed_text(encoder_hidden_states)
        rotary = self._rotary(grid, x.device)
        split = self._sequence_split(x.shape[1])
        if split is None:
            x = self._blocks(x, context, modulation, rotary, rows, None, None, interrupt)
        else:  # this rank's tokens, with their rotary angles and modulation rows; the whole sequence after
            local_rotary = (split.shard(rotary[0][None])[0], split.shard(rotary[1][None])[0])
            local_rows = None if rows is None else split.shard(rows)
            x = self._blocks(split.shard(x), context, modulation, local_rotary, local_rows, split, None, interrupt)
            x = self._sequence_parallel.gather(split, x)
        out = self._unpatchify(self._head(x, temb, rows), grid)
        return WanTransformerOutput(out) if return_dict else (out,)

    # -- packed: samples of different sizes in one forward -------------------------------

    @staticmethod
    def _packed_timesteps(timesteps: Tensor | Sequence[float | Tensor], counts: Sequence[int],
                          device: torch.device) -> Tensor | list[Tensor]:
        """`forward_packed`'s timesteps: a `[N]` tensor when every sample has one timestep (as
        before per-token timesteps existed: no extra work), else one tensor per sample, 0-d
        (shared by all its tokens) or `[S_i]` (one per patch token)."""
        n = len(counts)
        one_each = (timesteps.ndim <= 1 if isinstance(timesteps, Tensor)
                    else all(isinstance(t, int | float) for t in timesteps))
        if one_each:
            flat = torch.as_tensor(timesteps, device=device).reshape(-1)
            if flat.numel() != n:
                raise ValueError(f"need one timestep per sample ({n}), got {flat.numel()}")
            return flat
        if isinstance(timesteps, Tensor) and timesteps.ndim > 2:
            raise ValueError(f"timesteps must be [N] or [N, S], got {tuple(timesteps.shape)}")
        entries = [torch.as_tensor(t, device=device) for t in timesteps]  # [N, S] tensor: its rows
        if len(entries) != n:
            raise ValueError(f"need one timestep per sample ({n}), got {len(entries)}")
        out = []
        for i, (t, count) in enumerate(zip(entries, counts)):
            if t.numel() == 1 and t.ndim <= 1:
                out.append(t.reshape(()))
            elif t.ndim == 1 and t.numel() == count:
                out.append(t)
            else:
                raise ValueError(f"timesteps[{i}] must be one value or one per patch token ([{count}]), "
                                 f"got shape {tuple(t.shape)}")
        return torch.stack(out) if all(t.ndim == 0 for t in out) else out

    def forward_packed(
        self,
        latents: Sequence[Tensor],
        timesteps: Tensor | Sequence[float | Tensor],
        text_embeds: Sequence[Tensor],
        interrupt: Callable[[], bool] | None = None,
    ) -> list[Tensor]:
        """One forward over samples of different sizes: latents `[C, F_i, H_i, W_i]`, timesteps,
        text `[L_i, text_dim]` -> noise predictions `[C_out, F_i, H_i, W_i]`.

        `timesteps`: a tensor `[N]` or a sequence of N entries, each one timestep (a number or a
        0-d tensor) or one per patch token of its sample (`[S_i]`, (f, h, w) order: Wan2.2 TI2V),
        so one batch can mix both kinds.

        Tokens of all samples are concatenated (`[1, T, dim]`); attention runs packed
        (`[T, H, D]`) with self/cross `AttentionMetadata` built once here. Samples never see
        each other. If all samples share one shape and one text length this is the dense
        `forward` on the stacked batch (same math, the faster layout). `interrupt`: as `forward`'s.
        """
        n = len(latents)
        if n == 0 or len(text_embeds) != n:
            raise ValueError(f"need one text embedding per latent and at least one sample, got {n} latents "
                             f"and {len(text_embeds)} text embeddings")
        device = latents[0].device
        for i, (lat, text) in enumerate(zip(latents, text_embeds)):
            if lat.ndim != 4:
                raise ValueError(f"latents[{i}] must be [C, F, H, W], got {tuple(lat.shape)}")
            self._check_latent(lat.shape, f"latents[{i}]")
            if text.ndim != 2:
                raise ValueError(f"text_embeds[{i}] must be [L, text_dim], got {tuple(text.shape)}")
            self._check_text(text, f"text_embeds[{i}]")
        grids = [self._grid(*lat.shape[1:]) for lat in latents]
        counts = [f * h * w for f, h, w in grids]
        timesteps = self._packed_timesteps(timesteps, counts, device)
        per_token = None if isinstance(timesteps, Tensor) else [t.expand(c) for t, c in zip(timesteps, counts)]

        if len({lat.shape for lat in latents}) == 1 and len({text.shape for text in text_embeds}) == 1:
            stacked = timesteps if per_token is None else torch.stack(per_token)  # [N] or [N, S]
            (out,) = self.forward(torch.stack(list(latents)), stacked, torch.stack(list(text_embeds)),
                                  interrupt=interrupt)
            return list(out.unbind(0))
        text_lens = [text.shape[0] for text in text_embeds]
        self_metadata = AttentionMetadata.from_lengths(counts, device=device)
        cross_metadata = AttentionMetadata.from_lengths(counts, text_lens, device=device)
        if per_token is None:  # one row per sample: token -> its sample
            table = timesteps
            rows = token_samples(counts, device)
        else:  # a table of the distinct timesteps of all tokens
            table, rows = _timestep_table(torch.cat(per_token))

        x = torch.cat([self._embed_patches(lat[None]) for lat in latents], dim=1)  # [1, T, dim]
        temb, modulation = self.condition_embedder.embed_time(table, x.dtype)
        context = self.condition_embedder.embed_text(torch.cat(list(text_embeds)))[None]  # [1, sum L, dim]
        rotaries = [self._rotary(grid, x.device) for grid in grids]
        rotary = (torch.cat([c for c, _ in rotaries]), torch.cat([s for _, s in rotaries]))

        split = self._sequence_split(counts)
        if split is None:
            x = self._blocks(x, context, modulation, rotary, rows[None], self_metadata, cross_metadata, interrupt)
        else:  # each sample's tokens split across the ranks; local queries attend to their sample's whole text
            local_cross = AttentionMetadata.from_lengths(split.chunks, text_lens, device=device)
            local_rotary = (split.shard(rotary[0]), split.shard(rotary[1]))
            x = self._blocks(split.shard(x[0])[None], context, modulation, local_rotary, split.shard(rows)[None],
                             split, local_cross, interrupt)
            x = self._sequence_parallel.gather(split, x[0])[None]
        x = self._head(x, temb, rows[None])[0]
        return [self._unpatchify(part[None], grid)[0] for part, grid in zip(x.split(counts), grids)]
