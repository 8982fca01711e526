"""Shared fixtures: one tiny random Wan2.1 pipeline folder per test session, and its loaded pipeline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers.checkpoints import build_tiny_wan_pipeline


@pytest.fixture(scope="session")
def tiny_wan_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers-format tiny Wan2.1 T2V folder (seed 0, UniPC scheduler). Treat it as read-only."""
    return build_tiny_wan_pipeline(tmp_path_factory.mktemp("tiny_wan") / "pipeline", seed=0)


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_wan_path: Path) -> Iterator[Any]:
    """The tiny pipeline on one intra-op thread: its ops are too small to split, and on a busy 2-core
    machine OpenMP threads waiting for each other make every job several times slower."""
    import torch

    from ditserve import Pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield Pipeline.from_pretrained(tiny_wan_path)
    finally:
        torch.set_num_threads(threads)
