"""`compile_blocks`, the compile every DiT shares: its options meet torch.compile's rules."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ditserve.attention import AttentionMetadata
from ditserve.attention.parallel.hybrid import HybridSplit
from ditserve.attention.parallel.split import SequenceSplit
from ditserve.models.common import RECOMPILE_LIMIT, compile_blocks
from ditserve.models.cosmos3 import KVLayout
from ditserve.models.flux import TokenLayout


def test_a_compile_mode_replaces_the_default_tuning_options():
    """torch.compile takes a mode or options, not both: a mode drops the default coordinate-descent option."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)).eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
        compile_blocks(model, [model[0], model[2]], mode="default")
        assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-6)
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT
    torch._dynamo.reset()


def test_layouts_that_enter_compiled_blocks_are_not_frozen_dataclasses():
    """torch 2.11's dynamo guards on every field of a frozen dataclass (torch 2.13 reads them lazily),
    so a frozen layout made the H200 server recompile each block for every new count of packed
    samples (`len(seq_lens_k) == n`). test_flux_model's count test sees that only under torch 2.11."""
    for cls in (AttentionMetadata, TokenLayout, KVLayout, SequenceSplit, HybridSplit):
        assert dataclasses.is_dataclass(cls) and not cls.__dataclass_params__.frozen, cls.__name__
