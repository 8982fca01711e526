"""`compile_blocks`, the compile every DiT shares: its options meet torch.compile's rules."""

from __future__ import annotations

import torch
from torch import nn

from ditserve.models.common import RECOMPILE_LIMIT, compile_blocks


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
