"""Pipelines: one module per family (its request spec, loading and stages), and the registry."""

from ditserve.engine import GenerationCancelled, GenerationOutput
from ditserve.pipelines.base import Pipeline
from ditserve.pipelines.errors import PipelineConfigError
from ditserve.pipelines.registry import FAMILIES, family_class_for
from ditserve.pipelines.spec import read_request_spec

__all__ = [
    "FAMILIES",
    "GenerationCancelled",
    "GenerationOutput",
    "Pipeline",
    "PipelineConfigError",
    "family_class_for",
    "read_request_spec",
]
