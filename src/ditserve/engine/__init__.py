"""Request handling shared by the Python API, the CLI and the server: validation (more later)."""

from ditserve.engine.validation import MAX_SEED, GenerationRequest, InvalidRequest, validate_request

__all__ = ["MAX_SEED", "GenerationRequest", "InvalidRequest", "validate_request"]
