"""Shared fixtures: one tiny random Wan2.1 pipeline folder per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from ditserve.testing import build_tiny_wan_pipeline


@pytest.fixture(scope="session")
def tiny_wan_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers-format tiny Wan2.1 T2V folder (seed 0, UniPC scheduler). Treat it as read-only."""
    return build_tiny_wan_pipeline(tmp_path_factory.mktemp("tiny_wan") / "pipeline", seed=0)
