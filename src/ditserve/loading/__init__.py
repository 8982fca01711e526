"""Reading diffusers-format pipeline folders: model_index.json, configs, safetensors weights."""

from .component import load_component
from .errors import PipelineFolderError, UnknownModelError, WeightLoadError
from .folder import check_components, component_path, declared_class, declared_components, read_config, read_model_index
from .meta import instantiate_on_meta
from .weights import Checkpoint, find_checkpoint, load_weights

__all__ = [
    "Checkpoint",
    "PipelineFolderError",
    "UnknownModelError",
    "WeightLoadError",
    "check_components",
    "component_path",
    "declared_class",
    "declared_components",
    "find_checkpoint",
    "instantiate_on_meta",
    "load_component",
    "load_weights",
    "read_config",
    "read_model_index",
]
