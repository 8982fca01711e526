"""Per-row (per-token) FP8 quantization of a linear layer's input, in one pass over each row.

`torch.compile` writes this as a looped reduction once a row is wider than 1,024 values (a DiT's
rows are 3,072 to 13,824): one pass for the row's largest magnitude, a second to scale and round,
each re-reading the row (and re-computing a GELU fused in front of it). Here one program holds a
whole row in registers, reads it once and writes the e4m3 values and the scale.

`quantize_rows(x, gelu_tanh=False)` is a custom op: on CUDA the Triton kernel, elsewhere (or for
rows wider than `MAX_TRITON_COLS`) the same arithmetic in torch. With `gelu_tanh` the row is
tanh-GELU(x) first, computed in float32 (an FFN's second layer: its input's GELU rides in the pass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FP8_DTYPE", "FP8_MAX", "MAX_TRITON_COLS", "quantize_rows", "quantize_rows_reference", "quantize_rows_triton"]

try:  # Triton ships with CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
_TINY = torch.finfo(torch.float32).tiny
# amax times 1/448, not amax / 448: torch's CUDA division by a number multiplies by its float32 reciprocal, and a
# product is the same on every device and in the kernel
_INV_FP8_MAX = 1.0 / FP8_MAX
MAX_TRITON_COLS = 32_768  # a row held in one program's registers (64 float32 values a thread, 16 warps)


def quantize_rows_reference(x: Tensor, gelu_tanh: bool = False) -> tuple[Tensor, Tensor]:
    """`x` `[rows, cols]` -> (e4m3 values, float32 scale `[rows, 1]`) with (GELU of) x ~= values * scale.

    Each row's largest magnitude maps to e4m3's largest value; an all-zero row gets scale 1, and a row
    whose scale would underflow gets float32's smallest normal."""
    x = F.gelu(x.float(), approximate="tanh") if gelu_tanh else x.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, (amax * _INV_FP8_MAX).clamp_min(_TINY), torch.ones_like(amax))
    values = (x * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # times the reciprocal, as the kernel does
    return values, scale


if triton is not None:

    @triton.jit
    def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, cols, x_row_stride, fp8_max, inv_fp8_max, tiny,
                              GELU: tl.constexpr, BLOCK: tl.constexpr):
        """One program per row: load it once, (GELU,) amax, scale, round to the output's dtype."""
        row = tl.program_id(0).to(tl.int64)
        offsets = tl.arange(0, BLOCK)
        mask = offsets < cols
        x = tl.load(x_ptr + row * x_row_stride + offsets, mask=mask, other=0.0).to(tl.float32)
        if GELU:  # 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3); fast exp and divide
            inner = x + 0.044715 * x * x * x
            t = tl.exp2(tl.minimum(-2.3022082 * inner, 126.0))  # exp(-2u) = 2^(-2 sqrt(2/pi) log2(e) inner)
            x = tl.math.fdiv(x, 1.0 + t, ieee_rounding=False)
        amax = tl.max(tl.abs(x), axis=0)
        scale = tl.where(amax > 0, tl.maximum(amax * inv_fp8_max, tiny), 1.0)
        # one exact reciprocal a row, then a product per value (a division per value made the kernel ALU-bound)
        values = tl.clamp(x * tl.math.div_rn(1.0, scale), -fp8_max, fp8_max)
        tl.store(out_ptr + row * cols + offsets, values.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, scale)


def quantize_rows_triton(x: Tensor, out: Tensor, scale: Tensor, gelu_tanh: bool, num_warps: int | None = None) -> None:
    """The Triton kernel over `x` `[rows, cols]` (unit column stride) into `out` `[rows, cols]` (e4m3, or
    float32 to read the unrounded values, as the CPU tests do in Triton's interpreter) and `scale` `[rows]`.
    `num_warps`: a benchmark's sweep (default: 64 values a thread, 4 to 16 warps, the fastest of the sweep
    in docs/performance.md at both of Wan2.1-14B's widths)."""
    rows, cols = x.shape
    block = triton.next_power_of_2(cols)
    _quantize_rows_kernel[(rows,)](x, out, scale, cols, x.stride(0), FP8_MAX, _INV_FP8_MAX, _TINY, GELU=gelu_tanh,
                                   BLOCK=block, num_warps=num_warps or max(4, min(16, block // 2048)))


@torch.library.custom_op("ditserve::fp8_quantize_rows", mutates_args=())
def quantize_rows(x: Tensor, gelu_tanh: bool = False) -> tuple[Tensor, Tensor]:
    """`quantize_rows_reference`'s result; on CUDA from one pass of the Triton kernel."""
    if not (x.is_cuda and triton is not None and x.shape[-1] <= MAX_TRITON_COLS):
        return quantize_rows_reference(x, gelu_tanh)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    if x.shape[0]:
        quantize_rows_triton(x, out, scale, gelu_tanh)
    return out, scale


@quantize_rows.register_fake
def _(x: Tensor, gelu_tanh: bool = False) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty((x.shape[0], 1), dtype=torch.float32)
