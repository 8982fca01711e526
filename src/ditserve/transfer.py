"""Host-built tensors (index maps, `cu_seqlens`, per-token rows) onto the device without a host sync.

PyTorch copies pageable host memory to a GPU synchronously: `.to("cuda")` of a tensor built on the
host waits until the stream has run everything queued before it. A forward that builds its packed
layout that way drains the queue at every step, and the GPU then idles while the host launches the
next step's first kernels. From pinned memory the copy is asynchronous (PyTorch's pinned allocator
keeps the buffer until the copy has run), so the host stays ahead of the GPU across steps.
`token_samples` is the one such map every packed model builds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["to_device", "token_samples"]


def to_device(tensor: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """`tensor` (on the host) on `device`, queued on the current stream without waiting for it;
    None keeps it where it is."""
    if device is None:
        return tensor
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def token_samples(lens: Sequence[int], device: torch.device | str | None,
                  samples: Sequence[int] | None = None) -> torch.Tensor:
    """Each token's sample `[sum(lens)]` for samples of `lens` tokens one after another; `samples`: their
    indices (default 0, 1, ...). Built on the host and queued to `device` like `to_device`."""
    lens = list(lens)
    ids = torch.arange(len(lens)) if samples is None else torch.tensor(list(samples))
    return to_device(torch.repeat_interleave(ids, torch.tensor(lens), output_size=sum(lens)), device)
