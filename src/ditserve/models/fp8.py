"""FP8 (e4m3) linear layers: weights quantized once per output row, activations per token.

A `Float8Linear` keeps `weight` as float8 e4m3 with one float32 scale per output row, and
quantizes its input per row (token) on the fly (`kernels.fp8_rows`: one pass over each row on
CUDA), then runs torch's scaled matrix product (`torch._scaled_mm`, row-wise scales), which
multiplies in FP8 and accumulates in the tensor cores' fast mode (`use_fast_accum`: no periodic
promotion of the partial sums to float32; faster, and after 50 steps as close to bf16 as the
exact mode, per docs/performance.md). Per-row scales keep an outlier in one token or one output
channel from costing precision in the others.

Opt-in (`quantize="fp8"`): it trades a measured amount of quality for speed on GPUs with FP8
tensor cores (compute capability 8.9 and newer). CPUs run it too (slowly), which is what the
tests use.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ditserve.kernels.fp8_rows import FP8_DTYPE, quantize_rows

__all__ = ["FP8_DTYPE", "QUANTIZE_MODES", "Float8Linear", "fp8_unsupported_reason", "quantizable", "quantize_linears",
           "quantize_rows"]

QUANTIZE_MODES = ("fp8",)
_SIZE_MULTIPLE = 16  # the GPU's FP8 product takes inner and output sizes in multiples of 16


def quantizable(in_features: int, out_features: int) -> bool:
    """Whether a layer of these sizes can run as an FP8 product (on every device alike, so a CPU
    run quantizes the layers a GPU run does)."""
    return in_features % _SIZE_MULTIPLE == 0 and out_features % _SIZE_MULTIPLE == 0


def fp8_unsupported_reason(device: torch.device) -> str | None:
    """Why FP8 matrix products cannot run on `device`, or None."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return (f"FP8 needs a GPU with FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, "
                    f"Blackwell); {torch.cuda.get_device_name(device)} is sm{major}{minor}")
        return None
    if device.type != "cpu":
        return f"FP8 runs on CUDA GPUs (and the CPU), not {device.type}"
    return None


class Float8Linear(nn.Module):
    """`y = x W^T + b` with W in e4m3 (a scale per output row) and x quantized per row at run time.

    The output has the input's dtype. `.to(device)` moves it; a dtype change (`.to(torch.bfloat16)`)
    leaves the FP8 weight and the float32 scales as they are and converts only the bias.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        values, scale = quantize_rows(weight.detach())
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", values)  # [out, in]; `.t()` is the column-major operand _scaled_mm takes
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())  # [1, out]
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Float8Linear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: Tensor, *, gelu_first: bool = False) -> Tensor:
        """`gelu_first`: the layer of tanh-GELU(x), the GELU applied inside the input's quantizing pass (an
        FFN's second layer), which spares a read and write of the widest activation."""
        rows = x.reshape(-1, self.in_features)
        values, scale = quantize_rows(rows, gelu_first)
        # row-wise scaled products output bf16 on CUDA (the bias added in the kernel's epilogue, in bf16);
        # the CPU kernel also takes float32
        out_dtype = torch.bfloat16 if x.is_cuda else x.dtype
        bias = None if self.bias is None else self.bias.to(out_dtype)
        out = torch._scaled_mm(values, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=bias,
                               out_dtype=out_dtype, use_fast_accum=True)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        """Device moves apply to every tensor; dtype casts must not reach the FP8 weight or its scales
        (`Module.to(dtype)` casts every floating buffer): those travel as integer views."""
        self.weight = self.weight.view(torch.uint8)
        self.weight_scale = self.weight_scale.view(torch.int32)
        try:
            out = super()._apply(fn, recurse)
        finally:
            if self.weight.dtype == torch.uint8 and self.weight_scale.dtype == torch.int32:
                self.weight = self.weight.view(FP8_DTYPE)
                self.weight_scale = self.weight_scale.view(torch.float32)
        if self.weight.dtype != FP8_DTYPE:  # e.g. Module.type(), which casts integer tensors too
            raise TypeError("a Float8Linear's FP8 weights cannot change dtype (use .to(device) or .to(dtype), which "
                            "keep them); this layer is no longer usable")
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, e4m3"


def quantize_linears(modules: Iterable[nn.Module]) -> int:
    """Replace every `nn.Linear` inside `modules` whose sizes are `quantizable` by a `Float8Linear` of
    it (the others stay as they are); the number replaced."""
    replaced = 0
    for root in modules:
        for parent in list(root.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and quantizable(child.in_features, child.out_features):
                    setattr(parent, name, Float8Linear.from_linear(child))
                    replaced += 1
    return replaced
