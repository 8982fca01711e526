"""The FP8 attention kernel compiles for Hopper (sm_90a) on any machine, GPU or not, with every launch
option a benchmark sweeps: Triton's own compiler and ptxas, nothing run. A launch that would fail to
compile fails here instead of in a GPU session; the quantizing kernel's centering runs in Triton's
interpreter. Skips where Triton is not installed (the CPU build of torch does not bring it;
`pip install triton==3.6.0`)."""

from __future__ import annotations

import re

import pytest

triton = pytest.importorskip("triton")

from ditserve.kernels.fp8_attention import LaunchOptions, compile_only  # noqa: E402
from helpers.triton_interpreter import run_interpreted  # noqa: E402

LAUNCHES = [
    {},  # the defaults: 2 stages, at most 168 registers
    {"tma": False},
    {"block_m": 128, "num_warps": 8, "max_registers": None},
    {"num_stages": 3, "max_registers": None},
]


@pytest.mark.parametrize("launch", LAUNCHES, ids=lambda launch: ",".join(f"{k}={v}" for k, v in launch.items()) or "default")
@pytest.mark.parametrize("head_dim,keys,fp8_pv", [(128, 1024, True), (64, 1000, True), (32, 77, False)])
def test_fp8_attention_compiles_for_hopper(launch: dict, head_dim: int, keys: int, fp8_pv: bool):
    kernel = compile_only(90, head_dim, keys=keys, fp8_pv=fp8_pv, **launch)
    ptx = kernel.asm["ptx"]
    assert ".target sm_90a" in ptx and kernel.asm["cubin"]
    options = LaunchOptions(**launch)
    products = len(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.f32\.e4m3\.e4m3", ptx))
    assert products > 0  # q kᵀ (and P·V with fp8_pv) on FP8 tensor cores
    assert (".maxnreg 168" in ptx) == (options.max_registers == 168)
    if not launch:  # the default's point: shared memory for three tiles an SM (the register cap does the rest)
        assert 3 * (kernel.metadata.shared + 1024) <= 228 * 1024


def test_compile_only_leaves_the_real_driver_in_place():
    before = triton.runtime.driver._active
    compile_only(90, 64)
    assert triton.runtime.driver._active is before


def test_compile_only_refuses_a_head_dim_the_kernel_does_not_take():
    with pytest.raises(ValueError, match=r"head_dim must be one of 32, 64, 128, got 96"):
        compile_only(90, 96)


_CENTERED_QUANTIZE = """
import torch
from ditserve.kernels.fp8_attention import BLOCK, quantize_blocks
torch.manual_seed(0)
x, center = torch.randn(2, 200, 3, 32), torch.randn(2, 3, 32)
for transpose in (False, True):
    out, scales = quantize_blocks(x, 2.0, transpose=transpose, fp8=False, center=center)
    want = torch.zeros(2, 3, 256, 32)
    want[:, :, :200] = ((x - center[:, None]) * 2.0).transpose(1, 2)
    assert torch.equal(out, want.transpose(2, 3) if transpose else want), transpose
    assert torch.equal(scales, torch.ones(2, 3, 256 // BLOCK))
print("ok")
"""


def test_quantize_blocks_takes_the_center_out_and_keeps_padding_zero():
    """The per-channel center (k's mean) comes off inside the quantizing pass; padding rows stay zero so they
    cannot raise a block's scale. Triton's interpreter, in a process of its own (it is chosen at import)."""
    done = run_interpreted(_CENTERED_QUANTIZE)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
