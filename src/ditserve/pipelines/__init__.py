"""Pipelines: one module per family, built from shared stages (text, latents, denoise, decode)."""

from ditserve.pipelines.base import PIPELINE_CLASSES, Pipeline, pipeline_class_for
from ditserve.pipelines.errors import GenerationCancelled, PipelineConfigError
from ditserve.pipelines.result import GenerationOutput
from ditserve.pipelines.wan import WanPipeline

__all__ = [
    "PIPELINE_CLASSES",
    "GenerationCancelled",
    "GenerationOutput",
    "Pipeline",
    "PipelineConfigError",
    "WanPipeline",
    "pipeline_class_for",
]
