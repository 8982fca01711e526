"""The FP8 attention kernel for Hopper written in Gluon (Triton's lower-level language), for one thing the
Triton kernel cannot express: each key tile's softmax runs while the tensor cores compute the next tile's
q kᵀ (FlashAttention-3's intra-warpgroup overlap). Gluon makes the tensor-core products asynchronous and
places their waits explicitly; Triton waits on each product right away.

Same inputs, math and output as `fp8_attention`'s Triton kernel (`quantize_blocks`' buffers; scores in log2
units; probabilities x 2^P_LOG2 in e4m3; acc in units of the current V block's scale), with FP8 P·V only,
tiles of 64 queries (one warpgroup) or 128 (two, sharing the K/V tiles), TMA loads into two stages of K and
V each. Chosen with `fp8_attention(..., pipelined=True)` on Hopper.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover - Triton without Gluon (or no Triton: the CPU build of torch)
    gluon = None

__all__ = ["gluon_available", "launch_pipelined"]

BLOCK = 128  # tokens per quantization block and keys per tile (as the Triton kernel)


def gluon_available() -> bool:
    return gluon is not None


if gluon is not None:
    Q_BLOCK = gl.constexpr(BLOCK)

    @gluon.jit
    def _softmax(s, m_i, l_i, q_scale, k_scale, start, seq_k, MASKED: gl.constexpr, P_LOG2: gl.constexpr):
        """Online softmax of one tile of raw scores (log2 units): (probabilities x 2^P_LOG2, new max, new sum, alpha)."""
        if MASKED:
            keys = start + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s.type.layout))
            s = gl.where((keys < seq_k)[None, :], s, float("-inf"))
        qk_scale = q_scale * k_scale
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - (m_new - P_LOG2)[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        return p, m_new, l_i, alpha

    @gluon.jit
    def _load_tile(k_desc, v_desc, k_bar, v_bar, k_dst, v_dst, k_row, v_row, tile, BLOCK_N: gl.constexpr, pred):
        """Start the TMA loads of key tile `tile` and its value tile (transposed), each signalling its barrier."""
        mbarrier.expect(k_bar, k_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(k_desc, [k_row + tile * BLOCK_N, 0], k_bar, k_dst, pred=pred)
        mbarrier.expect(v_bar, v_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(v_desc, [v_row, tile * BLOCK_N], v_bar, v_dst, pred=pred)

    @gluon.jit
    def _gluon_fp8_attention(q_desc, k_desc, v_desc, q_scale_ptr, k_scale_ptr, v_scale_ptr, out_ptr,
                             seq_q, seq_k, heads, group, q_blocks, k_blocks, o_b, o_s, o_h,
                             D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, P_LOG2: gl.constexpr,
                             TAIL: gl.constexpr, num_warps: gl.constexpr):
        block = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // heads
        h = bh % heads
        kv = b * (heads // group) + h // group
        k_len = k_blocks * BLOCK_N
        n_tiles = gl.cdiv(seq_k, BLOCK_N)

        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 32])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, D, 32])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

        q_smem = gl.allocate_shared_memory(gl.float8e4nv, [BLOCK_M, D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(gl.float8e4nv, [2, BLOCK_N, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(gl.float8e4nv, [2, D, BLOCK_N], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(2):
            mbarrier.init(k_bars.index(i), count=1)
            mbarrier.init(v_bars.index(i), count=1)

        k_row, v_row = kv * k_len, kv * D
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [bh * q_blocks * Q_BLOCK + block * BLOCK_M, 0], q_bar, q_smem)
        for i in gl.static_range(2):  # K and V of the first two tiles
            _load_tile(k_desc, v_desc, k_bars.index(i), v_bars.index(i), k_smem.index(i), v_smem.index(i), k_row, v_row,
                       i, BLOCK_N, i < n_tiles)

        q_scale = gl.load(q_scale_ptr + bh * q_blocks + block * BLOCK_M // Q_BLOCK)
        k_scales = k_scale_ptr + kv * k_blocks
        v_scales = v_scale_ptr + kv * k_blocks
        zeros_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
        v_prev = gl.load(v_scales)

        mbarrier.wait(q_bar, phase=0)
        mbarrier.wait(k_bars.index(0), phase=0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zeros_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))

        for j in range(0, n_tiles - 1):  # every tile but the last: the next tile's q kᵀ runs during its softmax
            stage = j % 2
            nxt = j + 1
            mbarrier.wait(k_bars.index(nxt % 2), phase=(nxt // 2) & 1)
            s_next = warpgroup_mma(q_smem, k_smem.index(nxt % 2).permute((1, 0)), zeros_s, use_acc=False, is_async=True)
            p, m_i, l_i, alpha = _softmax(s, m_i, l_i, q_scale, gl.load(k_scales + j), j * BLOCK_N, seq_k, False, P_LOG2)
            v_scale = gl.load(v_scales + j)
            acc = acc * gl.convert_layout(alpha * (v_prev / v_scale), o_rows)[:, None]
            v_prev = v_scale
            mbarrier.wait(v_bars.index(stage), phase=(j // 2) & 1)
            pv = warpgroup_mma(gl.convert_layout(p.to(gl.float8e4nv), p_layout), v_smem.index(stage).permute((1, 0)), acc,
                               is_async=True)
            s, acc = warpgroup_mma_wait(num_outstanding=0, deps=(s_next, pv))
            _load_tile(k_desc, v_desc, k_bars.index(stage), v_bars.index(stage), k_smem.index(stage), v_smem.index(stage),
                       k_row, v_row, j + 2, BLOCK_N, j + 2 < n_tiles)  # both of this stage's tiles are consumed

        last = n_tiles - 1
        p, m_i, l_i, alpha = _softmax(s, m_i, l_i, q_scale, gl.load(k_scales + last), last * BLOCK_N, seq_k, TAIL, P_LOG2)
        v_scale = gl.load(v_scales + last)
        acc = acc * gl.convert_layout(alpha * (v_prev / v_scale), o_rows)[:, None]
        mbarrier.wait(v_bars.index(last % 2), phase=(last // 2) & 1)
        pv = warpgroup_mma(gl.convert_layout(p.to(gl.float8e4nv), p_layout), v_smem.index(last % 2).permute((1, 0)), acc,
                           is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(pv, ))

        mbarrier.invalidate(q_bar)
        for i in gl.static_range(2):
            mbarrier.invalidate(k_bars.index(i))
            mbarrier.invalidate(v_bars.index(i))
        out = acc * gl.convert_layout(v_scale / l_i, o_rows)[:, None]
        rows = block * BLOCK_M + gl.arange(0, BLOCK_M, layout=o_rows)
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        o_ptrs = out_ptr + b.to(gl.int64) * o_b + h.to(gl.int64) * o_h + rows[:, None].to(gl.int64) * o_s + cols[None, :]
        gl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=(rows < seq_q)[:, None])


def launch_pipelined(q8: Tensor, k8: Tensor, v8: Tensor, scales: tuple[Tensor, Tensor, Tensor], out: Tensor, seq_q: int,
                     seq_k: int, group: int, p_log2: int, *, block_m: int = 64, compile_only: bool = False) -> Any:
    """Launch (or only compile) the kernel over `quantize_blocks`' buffers: q8 `[B, H, S_pad, D]`, k8 the same
    for the K/V heads, v8 `[B, Hkv, D, S_pad]` (all e4m3), scales per 128-token block; out `[B, Sq, H, D]`."""
    if gluon is None:
        raise RuntimeError("the pipelined FP8 attention kernel needs Triton with Gluon (triton>=3.5)")
    batch, heads, _, dim = q8.shape
    q_blocks, k_blocks = q8.shape[2] // BLOCK, k8.shape[2] // BLOCK
    fp8 = gl.float8e4nv

    def descriptor(view: Tensor, block: list[int]) -> TensorDescriptor:
        return TensorDescriptor.from_tensor(view, block, gl.NVMMASharedLayout.get_default_for(block, fp8))

    descriptors = (descriptor(q8.view(-1, dim), [block_m, dim]), descriptor(k8.view(-1, dim), [BLOCK, dim]),
                   descriptor(v8.view(-1, v8.shape[-1]), [dim, BLOCK]))
    grid = (q_blocks * BLOCK // block_m, batch * heads)
    args = (*descriptors, *scales, out, seq_q, seq_k, heads, group, q_blocks, k_blocks,
            out.stride(0), out.stride(1), out.stride(2))
    constants = dict(D=dim, BLOCK_M=block_m, BLOCK_N=BLOCK, P_LOG2=p_log2, TAIL=seq_k % BLOCK != 0,
                     num_warps=block_m // 16)  # 16 query rows a warp
    if compile_only:
        return _gluon_fp8_attention.warmup(*args, grid=grid, **constants)
    return _gluon_fp8_attention[grid](*args, **constants)
