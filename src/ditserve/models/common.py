"""What every ditserve DiT shares: how it compiles (each repeated block on its own, attention left
eager), how its attention backend is switched, and where its dtype and device are read."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ditserve.attention import Attention, AttentionSelector, run_attention_eagerly
from ditserve.models.fp8 import quantize_linears

__all__ = ["RECOMPILE_LIMIT", "DiTModel", "compile_blocks"]

RECOMPILE_LIMIT = 64  # graphs a compiled block function may hold (torch's default: 8)


def compile_blocks(model: nn.Module, blocks: Iterable[nn.Module], **compile_kwargs: Any) -> None:
    """torch.compile each of `blocks` in place (blocks of one class share a graph) and make every
    `Attention` in `model` a graph break (`run_attention_eagerly`). With inductor (the default
    backend) coordinate-descent tuning of the fused kernels' block sizes is on unless `options` say
    otherwise or a `mode` is given (torch takes one of the two): it makes compiling slower and the
    Wan2.1-1.3B forward 2-3% faster.

    A block's first shape of each kind (packed, one sample, several stacked) compiles static, later
    ones one graph with dynamic sizes (the server's `warm_up` makes them all): about ten graphs a
    block function in a server. torch's default limit (8 a function) would send the shapes after it
    to eager, so the limit is raised to `RECOMPILE_LIMIT` (process-wide; never lowered). All-dynamic compiling
    (`dynamic=True`) needs fewer graphs but runs the Flux forward 4% slower (docs/performance.md)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    if compile_kwargs.get("backend", "inductor") == "inductor" and compile_kwargs.get("mode") is None:
        compile_kwargs["options"] = {"coordinate_descent_tuning": True, **compile_kwargs.get("options", {})}
    run_attention_eagerly(model)
    for block in blocks:
        block.compile(**compile_kwargs)


class DiTModel(nn.Module):
    """Base of the DiTs: each has `proj_out` (its output head), one `attention_selector` that
    every `Attention` inside it shares, and its repeated blocks (`repeated_blocks`)."""

    attention_selector: AttentionSelector
    proj_out: nn.Linear

    def repeated_blocks(self) -> list[nn.Module]:
        """The blocks the DiT repeats: what compiles as one graph and what FP8 quantizes."""
        raise NotImplementedError(f"{type(self).__name__} does not list its repeated blocks")

    def compile_blocks(self, **compile_kwargs: Any) -> None:
        """torch.compile each repeated block (`compile_blocks`): fuses the elementwise work around
        the matrix products (norms, modulation, rotary, gating, residuals)."""
        compile_blocks(self, self.repeated_blocks(), **compile_kwargs)

    def quantize_fp8(self) -> int:
        """Every linear layer of the repeated blocks in FP8 (`models.fp8`); the number quantized.
        The embeddings and the output head stay in the model's dtype. Call before `compile_blocks`."""
        return quantize_linears(self.repeated_blocks())

    def set_attention_backend(self, name: str | None) -> None:
        """Use a new selector ("auto", a backend name, or None) in every attention layer."""
        self.attention_selector = AttentionSelector(name)
        for module in self.modules():
            if isinstance(module, Attention):
                module.selector = self.attention_selector

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj_out.weight.device
