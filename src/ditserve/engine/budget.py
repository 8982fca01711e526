"""How many tokens one batched DiT step may hold: the default `max_batch_tokens`.

The budget counts video tokens (patches) of every sample in the step: a guided request is two
samples (cond and uncond), so a 480x832x81 Wan2.1 request costs 2 x 32,760 tokens. What
bounds it is activation memory, which grows linearly with tokens (attention kernels that
never materialise the score matrix: FlashAttention, cuDNN, varlen). Weights and the text
embeddings (512 per sample) are already resident or small beside it.

Default on CUDA, measured when the engine is built (after the model is loaded):
    max_batch_tokens = MEMORY_FRACTION * (free device memory + torch's cached free blocks)
                       / block_activation_bytes(inner_dim, ffn_dim, dtype)
The other half of the free memory stays for the VAE decode (which runs on its own thread,
alongside the forwards: `ditserve.engine.decoder`), allocator fragmentation and the
selector's first-call trials.
On the CPU memory is rarely the limit and time is, so the default is a fixed number.
"""

from __future__ import annotations

import torch

__all__ = ["CPU_MAX_BATCH_TOKENS", "MEMORY_FRACTION", "block_activation_bytes", "default_max_batch_tokens"]

CPU_MAX_BATCH_TOKENS = 65_536
MEMORY_FRACTION = 0.5


def block_activation_bytes(inner_dim: int, ffn_dim: int, dtype: torch.dtype) -> int:
    """An upper estimate of peak activation bytes per token inside one DiT block (no grad).

    Eager Wan blocks hold, per token, the MLP's hidden activations twice (linear output and
    GELU: 2 x ffn_dim) and about 16 model-width vectors (residual, q/k/v, the float32
    modulation and rotary temporaries): (2 * ffn_dim + 16 * inner_dim) elements of at least
    2 bytes. Wan2.1-1.3B in bf16: 85 KB per token. torch.compile fuses most temporaries
    away, so compiled blocks use less.
    """
    itemsize = max(torch.empty((), dtype=dtype).element_size(), 2)
    return (2 * ffn_dim + 16 * inner_dim) * itemsize


def default_max_batch_tokens(bytes_per_token: int, device: torch.device) -> int:
    """The default budget on `device` (see the module docstring); at least 1."""
    if bytes_per_token < 1:
        raise ValueError(f"bytes_per_token must be >= 1, got {bytes_per_token}")
    if device.type != "cuda":
        return CPU_MAX_BATCH_TOKENS
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(1, int(MEMORY_FRACTION * free) // bytes_per_token)
