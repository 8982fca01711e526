"""Attention with FP8 (e4m3) matrix products: a Triton kernel of ours, for Hopper and newer.

Attention is two thirds of a large video DiT's FLOPs, and no FP8 attention kernel for Hopper
installs from the package index here (FlashAttention-4's FP8 path is Blackwell-only; FA3 needs a
source build). This one quantizes q and k per block of 128 tokens of one head, v per block of
tokens too (stored transposed, the layout Hopper's FP8 tensor-core product takes for its second
operand), and the softmax probabilities per tile (scaled by 2^8 so that small ones keep e4m3's
precision); both products accumulate in float32, the softmax statistics stay float32. Each key
channel's mean over the tokens is taken out of k first: softmax does not see it, and the blocks
left have a smaller range to quantize.

`fp8_attention(q, k, v, scale)` takes ditserve's dense layout `[B, S, H, D]` (grouped-query K/V
heads allowed, any query and key lengths, no mask, not causal) and returns `[B, Sq, H, D]` in q's
dtype. It trades a measured amount of accuracy for speed; docs/performance.md has both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["BLOCK", "HEAD_DIMS", "LaunchOptions", "compile_only", "fp8_attention", "quantize_blocks", "triton_available"]

try:  # Triton ships with CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 128  # tokens per quantization block, and keys per tile of the kernel
HEAD_DIMS = (32, 64, 128)  # powers of two (Triton's tiles), at least one FP8 product's depth (32)
_P_LOG2 = 8  # probabilities in [0, 1] times 2^8: e4m3's normal range then reaches down to 2^-14
_V_AMAX_FLOOR = 1e-6  # a V block's amax floor: bounds the ratio of two blocks' scales in the kernel's rescale
_LOG2E = 1.4426950408889634


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _quantize_kernel(x_ptr, center_ptr, out_ptr, scale_ptr, seq, heads, s_b, s_s, s_h, multiplier, amax_floor,
                         BLOCK_S: tl.constexpr, D: tl.constexpr, TRANSPOSE: tl.constexpr, FP8: tl.constexpr,
                         CENTER: tl.constexpr, blocks):
        """One block of BLOCK_S tokens of one (batch, head), less its per-channel center (CENTER) and times
        `multiplier`: amax -> scale, then e4m3 values (or, without FP8, the values in the output's dtype and
        scale 1), written `[B, H, S_pad, D]` (or `[B, H, D, S_pad]` with TRANSPOSE); padding rows are zeros."""
        block, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        b, h = bh // heads, bh % heads
        rows = block * BLOCK_S + tl.arange(0, BLOCK_S)
        cols = tl.arange(0, D)
        mask = (rows < seq)[:, None]
        x = tl.load(x_ptr + b * s_b + h * s_h + rows[:, None].to(tl.int64) * s_s + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        if CENTER:
            x = tl.where(mask, x - tl.load(center_ptr + bh * D + cols)[None, :], 0.0)
        x = x * multiplier
        if FP8:
            scale = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), amax_floor) / 448.0
            values = (x / scale).to(tl.float8e4nv)
            tl.store(scale_ptr + bh * blocks + block, scale)
        else:  # the scales stay the ones the caller filled in
            values = x.to(out_ptr.dtype.element_ty)
        padded = blocks * BLOCK_S
        base = out_ptr + bh * padded * D
        if TRANSPOSE:
            tl.store(base + cols[:, None] * padded + rows[None, :], tl.trans(values))
        else:
            tl.store(base + rows[:, None] * D + cols[None, :], values)

    @triton.jit
    def _softmax_pv(acc, m_i, l_i, v_prev, raw, q_scale, v, k_scale_ptr, v_scale_ptr, start, seq_k,
                    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, P_LOG2: tl.constexpr):
        """One key block's raw scores q kᵀ -> online softmax (log2 units), probabilities x V accumulated
        by the product.

        Few passes over the [BLOCK_M, BLOCK_N] tile, because the softmax's elementwise work, not the
        FP8 products, bounds this kernel: the scale of the scores rides in one fused multiply-add
        with the row maximum, and 2^P_LOG2 of the probabilities' scaling in the exponent. `acc`
        is kept in units of the current V block's scale (`v_prev`), so the P·V product adds into
        it directly; the rescale to a new block's scale is one factor per row. v comes transposed,
        [D, BLOCK_N]."""
        if MASKED:
            raw = tl.where((start + tl.arange(0, BLOCK_N) < seq_k)[None, :], raw, float("-inf"))
        qk_scale = q_scale * tl.load(k_scale_ptr)
        m_new = tl.maximum(m_i, tl.max(raw, axis=1) * qk_scale)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(raw * qk_scale - (m_new - P_LOG2)[:, None])  # 2^P_LOG2 x the probabilities
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_scale = tl.load(v_scale_ptr)
        acc = tl.dot(p.to(v.dtype), tl.trans(v), acc * (alpha * (v_prev / v_scale))[:, None])
        return acc, m_new, l_i, v_scale

    @triton.jit
    def _load_k(k_ptrs, k_desc, kv, j, k_len, BLOCK_N: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr):
        """Key block j of K/V head `kv` (`k_len` padded keys a head), [BLOCK_N, D]: by tensor-memory-accelerator
        descriptor or by pointers."""
        if TMA:
            return k_desc.load([kv * k_len + j * BLOCK_N, 0])
        return tl.load(k_ptrs + j * BLOCK_N * D)

    @triton.jit
    def _load_v(v_ptrs, v_desc, kv, j, BLOCK_N: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr):
        """Value block j of K/V head `kv`, transposed: [D, BLOCK_N]."""
        if TMA:
            return v_desc.load([(kv * D).to(tl.int32), j * BLOCK_N])
        return tl.load(v_ptrs + j * BLOCK_N)

    @triton.jit
    def _fp8_attention_kernel(q_ptr, k_ptr, v_ptr, q_desc, k_desc, v_desc, q_scale_ptr, k_scale_ptr, v_scale_ptr,
                              out_ptr, seq_q, seq_k, heads, group, q_blocks, k_blocks, full_blocks, o_b, o_s, o_h,
                              D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Q_BLOCK: tl.constexpr,
                              P_LOG2: tl.constexpr, TAIL: tl.constexpr, TMA: tl.constexpr):
        block, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        b, h = bh // heads, bh % heads
        kv = b * (heads // group) + h // group
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, D)
        if TMA:
            q = q_desc.load([(bh * q_blocks * Q_BLOCK + block * BLOCK_M).to(tl.int32), 0])
        else:
            q = tl.load(q_ptr + (bh * q_blocks * Q_BLOCK + rows[:, None]) * D + cols[None, :])
        q_scale = tl.load(q_scale_ptr + bh * q_blocks + block * BLOCK_M // Q_BLOCK)  # tiles of BLOCK_M <= Q_BLOCK
        n = tl.arange(0, BLOCK_N)
        k_len = k_blocks * BLOCK_N  # padded keys a head; key tile j is quantization block j
        k_ptrs = k_ptr + (kv * k_len + n[:, None]) * D + cols[None, :]
        v_ptrs = v_ptr + kv * k_len * D + cols[:, None] * k_len + n[None, :]
        kv32 = kv.to(tl.int32)
        k_scales, v_scales = k_scale_ptr + kv * k_blocks, v_scale_ptr + kv * k_blocks
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        v_prev = tl.load(v_scales)  # acc's unit: the scale of the last V block added
        for j in tl.range(0, full_blocks):
            raw = tl.dot(q, tl.trans(_load_k(k_ptrs, k_desc, kv32, j, k_len, BLOCK_N, D, TMA)))
            v = _load_v(v_ptrs, v_desc, kv32, j, BLOCK_N, D, TMA)
            acc, m_i, l_i, v_prev = _softmax_pv(acc, m_i, l_i, v_prev, raw, q_scale, v, k_scales + j, v_scales + j,
                                                j * BLOCK_N, seq_k, BLOCK_N, False, P_LOG2)
        if TAIL:  # the last, partly filled key block
            raw = tl.dot(q, tl.trans(_load_k(k_ptrs, k_desc, kv32, full_blocks, k_len, BLOCK_N, D, TMA)))
            v = _load_v(v_ptrs, v_desc, kv32, full_blocks, BLOCK_N, D, TMA)
            acc, m_i, l_i, v_prev = _softmax_pv(acc, m_i, l_i, v_prev, raw, q_scale, v, k_scales + full_blocks,
                                                v_scales + full_blocks, full_blocks * BLOCK_N, seq_k, BLOCK_N, True,
                                                P_LOG2)
        out = acc * (v_prev / l_i)[:, None]
        o_ptrs = out_ptr + b * o_b + h * o_h + rows[:, None].to(tl.int64) * o_s + cols[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=(rows < seq_q)[:, None])


def quantize_blocks(x: Tensor, multiplier: float = 1.0, transpose: bool = False,
                    fp8: bool = True, amax_floor: float = 1e-30, center: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`x` `[B, S, H, D]` (less `center`, float32 `[B, H, D]`, if given; times `multiplier`) -> (e4m3
    `[B, H, S_pad, D]`, or `[B, H, D, S_pad]` when `transpose`; float32 scales `[B, H, S_pad / BLOCK]`),
    S_pad the next multiple of BLOCK. Without `fp8`, the same layout in x's dtype, scales 1."""
    batch, seq, heads, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    blocks = -(-seq // BLOCK)
    shape = (batch, heads, dim, blocks * BLOCK) if transpose else (batch, heads, blocks * BLOCK, dim)
    out = torch.empty(shape, dtype=torch.float8_e4m3fn if fp8 else x.dtype, device=x.device)
    scales = (torch.empty if fp8 else torch.ones)((batch, heads, blocks), dtype=torch.float32, device=x.device)
    if center is not None:
        center = center.to(torch.float32).contiguous()
    _quantize_kernel[(blocks, batch * heads)](x, center, out, scales, seq, heads, x.stride(0), x.stride(1), x.stride(2),
                                              multiplier, amax_floor, BLOCK_S=BLOCK, D=dim, TRANSPOSE=transpose, FP8=fp8,
                                              CENTER=center is not None, blocks=blocks, num_warps=4)
    return out, scales


def fp8_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, *, fp8_pv: bool = True, **launch: Any) -> Tensor:
    """softmax(q kᵀ · scale) v with FP8 products; q `[B, Sq, H, D]`, k/v `[B, Sk, Hkv, D]` -> `[B, Sq, H, D]`.

    `fp8_pv=False` keeps the probabilities x V product in q's dtype (only q kᵀ in FP8): the rounding of P
    and V goes, and so does that product's FP8 speed (docs/performance.md measures both).

    `launch`: options a benchmark may sweep, each giving the same result up to rounding (`LaunchOptions`).
    """
    if triton is None:
        raise RuntimeError("fp8_attention needs Triton (it ships with CUDA builds of torch)")
    options = LaunchOptions(**launch)
    batch, seq_q, heads, dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    if dim not in HEAD_DIMS or v.shape[-1] != dim:
        raise ValueError(f"fp8_attention takes head_dim {', '.join(map(str, HEAD_DIMS))} for q, k and v, "
                         f"got {dim} and {v.shape[-1]}")
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    q8, q_scales = quantize_blocks(q, scale * _LOG2E)  # scores come out in log2 units: exp2 in the kernel
    # A key channel's mean adds the same to every score of a query, so softmax ignores it; taking it out
    # (inside the quantizing pass) leaves k's blocks a smaller range to quantize (SageAttention's smoothing of K).
    k8, k_scales = quantize_blocks(k, center=k.mean(dim=1, dtype=torch.float32))
    v8, v_scales = quantize_blocks(v, transpose=True, fp8=fp8_pv, amax_floor=_V_AMAX_FLOOR)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    tma = options.tma if options.tma is not None else q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9
    _launch(q8, k8, v8, (q_scales, k_scales, v_scales), out, seq_q, seq_k, heads // kv_heads, options, tma,
            fp8_pv, compile_only=False)
    return out


@dataclass(frozen=True)
class LaunchOptions:
    """How `fp8_attention` launches its kernel; the defaults are the fastest measured on an H200
    (docs/performance.md). `bench/fp8_attention_sass.py` shows what each does to registers, shared
    memory and tiles an SM, without a GPU.

    num_warps, num_stages: Triton's. block_m: queries per tile (64 or 128). tma: tiles loaded by the
    tensor memory accelerator instead of per-thread pointers (None: where the GPU has one, Hopper and
    newer). max_registers: a cap per thread (ptxas's maxnreg; None: no cap). The default 168 with two
    stages lets three tiles share a Hopper SM instead of two.
    """

    num_warps: int = 4
    num_stages: int = 2
    block_m: int = 64
    tma: bool | None = None
    max_registers: int | None = 168

    def __post_init__(self) -> None:
        if self.block_m not in (64, BLOCK):
            raise ValueError(f"block_m must be 64 or {BLOCK}, got {self.block_m}")


def compile_only(arch: int = 90, head_dim: int = 128, *, keys: int = 1024, fp8_pv: bool = True, **launch: Any) -> Any:
    """The attention kernel compiled for sm_`arch`, not run, on any machine (Triton's compiler and ptxas;
    no GPU): its `.asm` (ptx, cubin) and `.metadata` (shared memory) for `launch`'s options, `keys` keys
    (a partial last tile when not a multiple of 128). Triton's compiled-kernel cache for the real
    device is left alone: the compile runs under a device of its own."""
    if triton is None:
        raise RuntimeError("compile_only needs Triton (pip install triton)")
    from triton.backends.compiler import GPUTarget

    options = LaunchOptions(**launch)
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {', '.join(map(str, HEAD_DIMS))}, got {head_dim}")
    device = ("compile-only", arch)

    class CompileOnlyDriver:  # what Triton's JIT asks of a driver before it compiles
        def get_current_target(self) -> GPUTarget:
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self) -> tuple:
            return device

        def get_current_stream(self, device: Any = None) -> int:
            return 0

    padded = -(-keys // BLOCK) * BLOCK
    q8 = torch.empty(1, 1, BLOCK, head_dim, dtype=torch.float8_e4m3fn)
    k8 = torch.empty(1, 1, padded, head_dim, dtype=torch.float8_e4m3fn)
    v8 = torch.empty(1, 1, head_dim, padded, dtype=torch.float8_e4m3fn if fp8_pv else torch.bfloat16)
    scales = tuple(torch.empty(1, 1, n, dtype=torch.float32) for n in (1, padded // BLOCK, padded // BLOCK))
    out = torch.empty(1, BLOCK, 1, head_dim, dtype=torch.bfloat16)
    previous = triton.runtime.driver._active  # the real driver (or None: not made yet), put back after
    triton.runtime.driver.set_active(CompileOnlyDriver())
    try:
        return _launch(q8, k8, v8, scales, out, BLOCK, keys, 1, options, options.tma is not False, fp8_pv,
                       compile_only=True)
    finally:
        triton.runtime.driver.set_active(previous)


def _launch(q8: Tensor, k8: Tensor, v8: Tensor, scales: tuple[Tensor, Tensor, Tensor], out: Tensor, seq_q: int,
            seq_k: int, group: int, options: LaunchOptions, tma: bool, fp8_pv: bool, *, compile_only: bool) -> Any:
    """Launch (or, with `compile_only`, only compile) the kernel over quantized buffers from `quantize_blocks`."""
    batch, heads = q8.shape[:2]
    q_blocks, k_blocks = q8.shape[2] // BLOCK, k8.shape[2] // BLOCK
    descriptors = _descriptors(q8, k8, v8, options.block_m) if tma else (None, None, None)
    grid = (q_blocks * BLOCK // options.block_m, batch * heads)
    args = (q8, k8, v8, *descriptors, *scales, out, seq_q, seq_k, heads, group, q_blocks, k_blocks,
            seq_k // BLOCK, out.stride(0), out.stride(1), out.stride(2))
    constants = dict(D=q8.shape[-1], BLOCK_M=options.block_m, BLOCK_N=BLOCK, Q_BLOCK=BLOCK,
                     P_LOG2=_P_LOG2 if fp8_pv else 0, TAIL=seq_k % BLOCK != 0, TMA=tma,
                     num_warps=options.num_warps, num_stages=options.num_stages,
                     **({} if options.max_registers is None else {"maxnreg": options.max_registers}))
    if compile_only:
        return _fp8_attention_kernel.warmup(*args, grid=grid, **constants)
    return _fp8_attention_kernel[grid](*args, **constants)


def _descriptors(q8: Tensor, k8: Tensor, v8: Tensor, block_m: int) -> tuple:
    """Host-side tensor descriptors over the quantized buffers seen as 2-D: q and k `[B·H·S_pad, D]`,
    v (transposed) `[B·H·D, S_pad]`."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    dim = q8.shape[-1]
    return (TensorDescriptor.from_tensor(q8.view(-1, dim), [block_m, dim]),
            TensorDescriptor.from_tensor(k8.view(-1, dim), [BLOCK, dim]),
            TensorDescriptor.from_tensor(v8.view(-1, v8.shape[-1]), [dim, BLOCK]))
