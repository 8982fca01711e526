"""The FP8 attention kernel compiles for Hopper (sm_90a) on any machine, GPU or not, with every launch
option a benchmark sweeps: Triton's own compiler and ptxas, nothing run. A launch that would fail to
compile fails here instead of in a GPU session. Skips where Triton is not installed (the CPU build of
torch does not bring it; `pip install triton==3.6.0`)."""

from __future__ import annotations

import re

import pytest

triton = pytest.importorskip("triton")

from ditserve.kernels.fp8_attention import LaunchOptions, compile_only  # noqa: E402

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
    assert kernel.metadata.shared <= 227 * 1024  # fits one Hopper SM


def test_compile_only_leaves_the_real_driver_in_place():
    before = triton.runtime.driver._active
    compile_only(90, 64)
    assert triton.runtime.driver._active is before


def test_compile_only_refuses_a_head_dim_the_kernel_does_not_take():
    with pytest.raises(ValueError, match=r"head_dim must be one of 32, 64, 128, got 96"):
        compile_only(90, 96)
