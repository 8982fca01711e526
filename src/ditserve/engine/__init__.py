"""Request handling shared by the Python API, the CLI and the server.

`validation`: request checks (re-exported here). `batching`: the continuous-batching engine
(many requests, one packed DiT forward per step), with its admission `policy` and token
`budget`. Import those from their modules: the engine builds on `ditserve.pipelines`, which
imports this package, so it is not re-exported here.
"""

from ditserve.engine.validation import MAX_SEED, GenerationRequest, InvalidRequest, validate_request

__all__ = ["MAX_SEED", "GenerationRequest", "InvalidRequest", "validate_request"]
