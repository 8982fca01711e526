"""RMSNorm of q and k over all heads, then the 3D rotary, in one pass over memory.

Wan's self-attention normalises q and k across the whole model width (a reduction over all
heads) and then rotates channel pairs (2i, 2i+1) of every head. torch.compile turns this into
a looped reduction kernel that reads q and k twice and gathers the pairs with strided loads,
several times the memory floor (docs/performance.md). This Triton kernel
keeps one token's row in registers, splits it into (even, odd) pairs once, and writes q and k
rotated, so each byte is read and written once.

`qk_rms_norm_rotary` is a torch custom op: torch.compile keeps it whole, and on a CPU (or
without Triton) it runs the same math in torch, which is what the model did before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["qk_rms_norm_rotary", "rotate_pairs", "triton_available"]

try:  # Triton ships with CUDA builds of torch; CPU builds run the torch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def triton_available() -> bool:
    return triton is not None


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (2i, 2i+1) of x `[..., S, H, D]` by cos/sin `[..., S, 1, D/2]`.

    The products run in float32 (cos/sin are float32; x promotes), then round back to x's dtype.
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


def _torch_path(q: Tensor, k: Tensor, weight_q: Tensor, weight_k: Tensor, cos: Tensor, sin: Tensor,
                eps: float, heads: int) -> tuple[Tensor, Tensor]:
    """The reference math: `nn.RMSNorm` in the input dtype, then `rotate_pairs` per head."""
    rows = cos.shape[0]
    shape = (-1, rows, heads, q.shape[-1] // heads)
    cos_b, sin_b = cos[:, None, :], sin[:, None, :]  # [R, 1, D/2] broadcasts over heads
    out = []
    for x, w in ((q, weight_q), (k, weight_k)):
        normed = F.rms_norm(x, (x.shape[-1],), w, eps)
        out.append(rotate_pairs(normed.reshape(shape), cos_b, sin_b).reshape(*x.shape[:-1], heads, -1))
    return out[0], out[1]


if triton is not None:

    @triton.jit
    def _norm_rotate_row(x_ptr, w_ptr, out_ptr, offsets, mask2, cos, sin, eps, DIM: tl.constexpr):
        """One row: RMSNorm over all DIM channels (float32), weight, rotate (even, odd) pairs."""
        x = tl.load(x_ptr + offsets, mask=mask2, other=0.0).to(tl.float32)
        inv_rms = 1.0 / tl.sqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / DIM + eps)
        w = tl.load(w_ptr + offsets, mask=mask2, other=0.0).to(tl.float32)
        even, odd = tl.split(x * inv_rms * w)
        rotated = tl.join(even * cos - odd * sin, even * sin + odd * cos)
        tl.store(out_ptr + offsets, rotated.to(out_ptr.dtype.element_ty), mask=mask2)

    @triton.jit
    def _qk_norm_rotary_kernel(
        q_ptr, k_ptr, q_row_stride, k_row_stride,
        wq_ptr, wk_ptr, cos_ptr, sin_ptr, rotary_rows,
        q_out_ptr, k_out_ptr, eps,
        DIM: tl.constexpr, HEAD_HALF: tl.constexpr, PAIRS: tl.constexpr,
    ):
        """One token per program: its rows of q and k, as (even, odd) channel pairs."""
        row = tl.program_id(0).to(tl.int64)
        pair = tl.arange(0, PAIRS)
        mask = pair < DIM // 2
        offsets = 2 * pair[:, None] + tl.arange(0, 2)[None, :]  # [PAIRS, 2]: channels 2i, 2i+1
        mask2 = offsets < DIM
        rot = (row % rotary_rows) * HEAD_HALF + pair % HEAD_HALF  # pair i of a head -> cos/sin column
        cos = tl.load(cos_ptr + rot, mask=mask, other=0.0)
        sin = tl.load(sin_ptr + rot, mask=mask, other=0.0)
        _norm_rotate_row(q_ptr + row * q_row_stride, wq_ptr, q_out_ptr + row * DIM, offsets, mask2, cos, sin,
                         eps, DIM)
        _norm_rotate_row(k_ptr + row * k_row_stride, wk_ptr, k_out_ptr + row * DIM, offsets, mask2, cos, sin,
                         eps, DIM)


def _rows(x: Tensor) -> Tensor:
    """x as `[N, dim]` rows with unit column stride (a view when x allows it)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


@torch.library.custom_op("ditserve::qk_rms_norm_rotary", mutates_args=())
def qk_rms_norm_rotary(q: Tensor, k: Tensor, weight_q: Tensor, weight_k: Tensor, cos: Tensor, sin: Tensor,
                       eps: float, heads: int) -> tuple[Tensor, Tensor]:
    """RMSNorm(q), RMSNorm(k) over the last dim (`dim = heads * head_dim`), then rotary.

    q, k `[..., S, dim]` (any row stride, e.g. slices of a fused qkv projection); weights
    `[dim]`; cos/sin `[R, head_dim / 2]` float32 where token t of the flattened rows uses row
    `t % R` (R = S for a dense batch, R = T for packed tokens). Returns q, k as
    `[..., S, heads, head_dim]`, contiguous, in q's dtype.
    """
    if q.is_cuda and triton is not None:
        return _triton_path(q, k, weight_q, weight_k, cos, sin, eps, heads)
    return _torch_path(q, k, weight_q, weight_k, cos, sin, eps, heads)


@qk_rms_norm_rotary.register_fake
def _(q: Tensor, k: Tensor, weight_q: Tensor, weight_k: Tensor, cos: Tensor, sin: Tensor,
      eps: float, heads: int) -> tuple[Tensor, Tensor]:
    shape = (*q.shape[:-1], heads, q.shape[-1] // heads)
    return q.new_empty(shape), q.new_empty(shape)


def _triton_path(q: Tensor, k: Tensor, weight_q: Tensor, weight_k: Tensor, cos: Tensor, sin: Tensor,
                 eps: float, heads: int) -> tuple[Tensor, Tensor]:
    dim = q.shape[-1]
    q_rows, k_rows = _rows(q), _rows(k)
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    q_out = torch.empty(q_rows.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k_rows.shape, dtype=q.dtype, device=q.device)
    pairs = triton.next_power_of_2(dim // 2)
    _qk_norm_rotary_kernel[(q_rows.shape[0],)](
        q_rows, k_rows, q_rows.stride(0), k_rows.stride(0),
        weight_q.contiguous(), weight_k.contiguous(), cos, sin, cos.shape[0],
        q_out, k_out, eps,
        DIM=dim, HEAD_HALF=dim // heads // 2, PAIRS=pairs,
        num_warps=4 if pairs <= 1024 else 8,
    )
    shape = (*q.shape[:-1], heads, dim // heads)
    return q_out.view(shape), k_out.view(shape)
