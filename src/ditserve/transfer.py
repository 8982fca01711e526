"""Host-built tensors (index maps, `cu_seqlens`, per-token rows) onto the device without a host sync.

PyTorch copies pageable host memory to a GPU synchronously: `.to("cuda")` of a tensor built on the
host waits until the stream has run everything queued before it. A forward that builds its packed
layout that way drains the queue at every step, and the GPU then idles while the host launches the
next step's first kernels. From pinned memory the copy is asynchronous (PyTorch's pinned allocator
keeps the buffer until the copy has run), so the host stays ahead of the GPU across steps.
"""

from __future__ import annotations

import torch

__all__ = ["to_device"]


def to_device(tensor: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """`tensor` (on the host) on `device`, queued on the current stream without waiting for it;
    None keeps it where it is."""
    if device is None:
        return tensor
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
