"""DiT model families, one file each; parameter names match diffusers' checkpoints."""

from ditserve.models.wan import WanTransformer3DModel, WanTransformerConfig, WanTransformerOutput

__all__ = ["WanTransformer3DModel", "WanTransformerConfig", "WanTransformerOutput"]
