"""A folder's request spec without loading its weights (for the CLI and the server)."""

from __future__ import annotations

import os
from pathlib import Path

from ditserve.engine import RequestSpec
from ditserve.loading import read_model_index
from ditserve.pipelines.registry import family_class_for

__all__ = ["read_request_spec"]


def read_request_spec(path: str | os.PathLike[str]) -> RequestSpec:
    """The request parameters of the pipeline folder at `path`: its family's, with the folder's defaults.

    Reads JSON configs only, so it is cheap and raises the loading errors (`PipelineFolderError`,
    `UnknownModelError`) before any weight is read.
    """
    root = Path(path)
    index = read_model_index(root)
    return family_class_for(index, root / "model_index.json").folder_request_spec(root, index)
