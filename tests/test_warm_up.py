"""The server's warm-up leaves no compiling to clients: after it, a compiled pipeline meets no new graph."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ditserve import Pipeline
from ditserve.server.main import warm_up
from helpers.checkpoints import build_tiny_flux_pipeline

# A burst's batches, none of them the warm-up's sizes or counts: (height, width, frames) per request.
BURST = [[(64, 64, 1)], [(64, 48, 5)] * 4, [(32, 32, 1), (48, 64, 1), (64, 64, 5), (80, 80, 1)], [(80, 32, 1)] * 2,
         [(96, 96, 1), (32, 32, 5)]]


@pytest.fixture(params=["wan", "flux"])
def compiled_pipeline(request: pytest.FixtureRequest, tiny_wan_path: Path, tmp_path: Path) -> Any:
    path = tiny_wan_path if request.param == "wan" else build_tiny_flux_pipeline(tmp_path / "flux")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    pipeline = Pipeline.from_pretrained(path)
    for module in pipeline.denoisers():
        module.compile_blocks(backend="eager")  # dynamo's graphs and guards, without inductor's codegen
    yield pipeline
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def test_after_the_warm_up_a_burst_of_new_sizes_and_counts_compiles_nothing(compiled_pipeline: Any) -> None:
    counters = torch._dynamo.utils.counters
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        assert warm_up(compiled_pipeline) > 0
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0
        spec = compiled_pipeline.request_spec
        for batch in BURST:
            compiled_pipeline.generate_batch([
                dict(prompt=f"request {i}", height=h, width=w, num_inference_steps=2, seed=i,
                     **({"num_frames": frames} if spec.param("num_frames").maximum > 1 else {}))
                for i, (h, w, frames) in enumerate(batch)])
        assert counters["stats"]["unique_graphs"] == graphs
