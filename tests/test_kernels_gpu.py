"""The fused q/k RMSNorm + rotary kernel on the GPU against the float64 math it replaces."""

from __future__ import annotations

import pytest
import torch

from ditserve.kernels import qk_norm_rotary as kernel
from ditserve.models.wan import wan_rotary_cos_sin

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not kernel.triton_available(), reason="needs Triton"),
]


def _inputs(heads: int, head_dim: int, grid: tuple[int, int, int], batch: int, dtype: torch.dtype, fused: bool):
    g = torch.Generator(device="cuda").manual_seed(0)
    dim = heads * head_dim
    tokens = grid[0] * grid[1] * grid[2]
    if fused:  # q and k as strided slices of one qkv projection output
        qkv = torch.randn(batch, tokens, 3 * dim, device="cuda", generator=g).to(dtype)
        q, k = qkv[..., :dim], qkv[..., dim : 2 * dim]
    else:
        q = torch.randn(batch, tokens, dim, device="cuda", generator=g).to(dtype)
        k = 3 * torch.randn(batch, tokens, dim, device="cuda", generator=g).to(dtype)
    wq = (1 + 0.5 * torch.randn(dim, device="cuda", generator=g)).to(dtype)
    wk = (1 + 0.5 * torch.randn(dim, device="cuda", generator=g)).to(dtype)
    cos, sin = (t.cuda() for t in wan_rotary_cos_sin(head_dim, grid))
    return q, k, wq, wk, cos, sin


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,head_dim,grid,batch,fused", [
    (12, 128, (3, 30, 52), 1, False),  # Wan2.1-1.3B width
    (12, 128, (2, 8, 12), 2, True),    # dense batch of 2 sharing one rotary table; strided q/k
    (40, 128, (1, 6, 10), 1, True),    # Wan2.1-14B width (5120: a non-power-of-two row)
    (4, 12, (2, 3, 4), 3, False),      # tiny head_dim: pairs straddle the (t, h, w) split
])
def test_kernel_matches_float64_reference(heads, head_dim, grid, batch, fused, dtype):
    q, k, wq, wk, cos, sin = _inputs(heads, head_dim, grid, batch, dtype, fused)
    exact = kernel._torch_path(q.double(), k.double(), wq.double(), wk.double(), cos.double(), sin.double(), 1e-6, heads)
    torch_out = kernel._torch_path(q, k, wq, wk, cos, sin, 1e-6, heads)
    fused_out = kernel.qk_rms_norm_rotary(q, k, wq, wk, cos, sin, 1e-6, heads)
    tolerance = 1e-5 if dtype == torch.float32 else 1.6e-2  # two bf16 roundings of values up to ~8
    for got, ref, eager in zip(fused_out, exact, torch_out):
        assert got.shape == (batch, grid[0] * grid[1] * grid[2], heads, head_dim)
        assert got.dtype == dtype and got.is_contiguous()
        err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        eager_err = ((eager.double() - ref).abs().max() / ref.abs().max()).item()
        assert err <= tolerance, err
        assert err <= 2 * eager_err + 1e-7  # no less accurate than the torch ops it replaces


def test_kernel_under_torch_compile():
    q, k, wq, wk, cos, sin = _inputs(12, 128, (2, 8, 12), 1, torch.bfloat16, True)

    def fn(q, k):
        return kernel.qk_rms_norm_rotary(q * 2, k, wq, wk, cos, sin, 1e-6, 12)

    compiled = torch.compile(fn, fullgraph=True)
    for got, ref in zip(compiled(q, k), fn(q, k)):
        assert torch.equal(got, ref)
