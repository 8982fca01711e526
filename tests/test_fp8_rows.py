"""Per-row FP8 quantization of activations (`kernels.fp8_rows`): the torch path against float64, the
Triton kernel against the torch path in Triton's interpreter (CPU, unrounded float32 output: the
interpreter's e4m3 rounding is not the GPU's) and on a GPU (e4m3, marked), and the FFN's fused GELU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ditserve.kernels.fp8_rows import FP8_DTYPE, FP8_MAX, MAX_TRITON_COLS, quantize_rows, quantize_rows_reference
from ditserve.models.fp8 import fp8_unsupported_reason, quantize_linears
from ditserve.models.wan import FeedForward
from helpers.triton_interpreter import run_interpreted

_E4M3_REL = 2.0**-4  # half a unit in the last place of e4m3's 3 mantissa bits, relative


def test_gelu_first_quantizes_the_gelu_of_each_row():
    """Dequantized, the values are tanh-GELU(x) (float64) to e4m3's precision, each row's largest at the limit."""
    x = torch.randn(7, 300, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    values, scale = quantize_rows(x.to(torch.bfloat16), gelu_tanh=True)
    want = F.gelu(x.to(torch.bfloat16).double(), approximate="tanh")
    assert values.dtype == FP8_DTYPE and scale.shape == (7, 1)
    assert (values.float().abs().amax(dim=1) == FP8_MAX).all()
    got = values.double() * scale.double()
    assert ((got - want).abs() <= _E4M3_REL * want.abs() + 2.0**-9 * scale.double()).all()  # subnormals: absolute


def test_the_ffn_of_an_fp8_model_quantizes_the_gelu_it_would_have_applied():
    """FP8 FFN (the GELU inside the second layer's quantizing pass) = its two FP8 layers with the GELU between."""
    torch.manual_seed(0)
    ffn = FeedForward(32, 64)
    reference = FeedForward(32, 64)
    reference.load_state_dict(ffn.state_dict())
    assert quantize_linears([ffn]) == 2
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        hidden = F.gelu(ffn.net[0].proj(x), approximate="tanh")
        assert torch.equal(ffn(x), ffn.net[2](hidden))
        exact = reference(x)
        assert ((ffn(x) - exact).norm() / exact.norm()).item() < 0.1  # two layers, each to e4m3 precision


def test_the_op_traces_whole_under_compile():
    """The custom op's fake (shapes and dtypes for tracing) agrees with what it computes: a compiled FP8 FFN
    is one graph and gives the eager output."""
    torch.manual_seed(0)
    ffn = FeedForward(32, 64)
    assert quantize_linears([ffn]) == 2
    x = torch.randn(3, 5, 32)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            assert torch.equal(torch.compile(ffn, backend="aot_eager", fullgraph=True)(x), ffn(x))
    finally:
        torch._dynamo.reset()


_INTERPRETED = """
import torch, torch.nn.functional as F
from ditserve.kernels.fp8_rows import FP8_MAX, quantize_rows_reference, quantize_rows_triton
torch.manual_seed(0)
for rows, cols, stride in ((5, 100, 100), (3, 1000, 1100), (2, 5120, 5120)):
    x = (torch.randn(rows, stride) * 4).to(torch.bfloat16)[:, :cols]
    x[-1] = 0  # an all-zero row: scale 1, values 0
    for gelu in (False, True):
        out, scale = torch.empty(rows, cols), torch.empty(rows)
        quantize_rows_triton(x, out, scale, gelu)
        row = F.gelu(x.float(), approximate="tanh") if gelu else x.float()
        _, want_scale = quantize_rows_reference(x, gelu)
        want = (row * (1.0 / want_scale)).clamp(-FP8_MAX, FP8_MAX)
        if gelu:  # the kernel's GELU is written with exp2 and an approximate division
            assert torch.allclose(scale, want_scale[:, 0], rtol=1e-6, atol=0), (cols, gelu)
            assert torch.allclose(out, want, rtol=1e-5, atol=1e-4), (cols, gelu)
        else:
            assert torch.equal(scale, want_scale[:, 0]) and torch.equal(out, want), (cols, gelu)
        assert scale[-1].item() == 1.0 and torch.count_nonzero(out[-1]) == 0
print("ok")
"""


def test_the_triton_kernel_computes_the_torch_paths_values_before_rounding():
    """Strided rows, widths that are not powers of two, an all-zero row, with and without the GELU."""
    pytest.importorskip("triton")
    done = run_interpreted(_INTERPRETED)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cols", [64, 3072, 5120, 13824, MAX_TRITON_COLS + 16])
def test_gpu_kernel_rounds_as_the_torch_path_does(cols: int):
    """Bit for bit without the GELU (the same exact reciprocal and product, rounded to nearest even, as torch
    does); with it, no value more than one e4m3 step away (the kernel's GELU differs in the last float32 bits).
    The widest rows take the torch path."""
    if fp8_unsupported_reason(torch.device("cuda")) is not None:
        pytest.skip("this GPU has no FP8 tensor cores")
    x = (torch.randn(1000, cols + 8, device="cuda") * 5).to(torch.bfloat16)[:, :cols]
    values, scale = quantize_rows(x)
    want_values, want_scale = quantize_rows_reference(x)
    assert torch.equal(scale, want_scale) and torch.equal(values.view(torch.uint8), want_values.view(torch.uint8))
    values, scale = quantize_rows(x, gelu_tanh=True)
    want_values, want_scale = quantize_rows_reference(x, gelu_tanh=True)
    assert torch.allclose(scale, want_scale, rtol=1e-6, atol=0)
    steps = (values.view(torch.uint8).int() - want_values.view(torch.uint8).int()).abs()
    assert steps.max().item() <= 1, steps.max().item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_compiled_fp8_ffn_matches_eager():
    """Under torch.compile the kernel is an opaque custom op: the compiled FFN gives the eager one's output."""
    if fp8_unsupported_reason(torch.device("cuda")) is not None:
        pytest.skip("this GPU has no FP8 tensor cores")
    torch.manual_seed(0)
    ffn = FeedForward(256, 1024)
    assert quantize_linears([ffn]) == 2
    ffn = ffn.to("cuda", torch.bfloat16)
    x = torch.randn(4, 333, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = ffn(x)
        compiled = torch.compile(ffn, fullgraph=True)(x)
    assert torch.equal(eager, compiled)
