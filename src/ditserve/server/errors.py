"""Error responses in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Status codes: 422 the body is not the right shape (not JSON, unknown or missing fields,
wrong JSON types, a value outside an enum); 400 the right shape but a value the model does
not accept (size, frames, steps, guidance, seed, n); 404 unknown job or model; 409 the job
is in the wrong state for the call; 429 the queue is full (Retry-After); 503 loading or
shutting down.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ditserve.engine import InvalidRequest
from ditserve.server.admission import ModelNotServed
from ditserve.server.responses import AsciiJSONResponse

__all__ = ["ApiError", "error_response", "install_error_handlers"]

log = logging.getLogger("ditserve.server")


class ApiError(Exception):
    """Raise from a route to answer with an OpenAI-style error."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})


def error_response(error: ApiError) -> JSONResponse:
    body = {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
    return AsciiJSONResponse(body, status_code=error.status, headers=error.headers)


def _fields_of(model: type[BaseModel]) -> str:
    names = []
    for name, info in model.model_fields.items():
        alias = info.validation_alias
        names.append(f"{name} (or {alias.choices[1]})" if alias is not None and hasattr(alias, "choices") else name)
    return ", ".join(names)


def _describe(error: Mapping[str, Any], body_model: type[BaseModel] | None) -> tuple[str, str | None]:
    """One pydantic error -> (message, field)."""
    loc = [str(p) for p in error.get("loc", ()) if p != "body"]
    field = ".".join(loc) or None
    kind = error.get("type", "")
    accepted = f"; accepted fields: {_fields_of(body_model)}" if body_model is not None else ""
    if kind == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON ({reason})".replace(" ()", ""), None
    if kind == "extra_forbidden":
        return f"{field}: unknown field{accepted}", field
    if kind == "missing":
        if field is None:
            return f"the request body must be a JSON object{accepted}", None
        return f"{field}: field required", field
    if field is None or kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"the request body must be a JSON object{accepted}, got {type(error.get('input')).__name__}", None
    return f"{field}: {error.get('msg', 'invalid value')}, got {error.get('input')!r}", field


def install_error_handlers(app: FastAPI, bodies: Mapping[str, type[BaseModel]]) -> None:
    """`bodies`: request path -> its body model, so 'unknown field' errors can list the accepted ones."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(ModelNotServed)
    async def _model_not_served(_: Request, exc: ModelNotServed) -> JSONResponse:
        return error_response(ApiError(404, str(exc), param=exc.field, code="model_not_found"))

    @app.exception_handler(InvalidRequest)
    async def _invalid(_: Request, exc: InvalidRequest) -> JSONResponse:
        return error_response(ApiError(400, str(exc), param=exc.field, code="invalid_value"))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        described = [_describe(e, bodies.get(request.url.path)) for e in exc.errors()]
        message = "; ".join(dict.fromkeys(m for m, _ in described))  # unique, in order
        param = next((f for _, f in described if f), None)
        return error_response(ApiError(422, message, param=param, code="invalid_body"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        """A bug, not a client error: a clean 500 that closes the connection (its state is unknown); the
        traceback goes to the log (uvicorn logs it after this answer)."""
        log.error("unexpected %s answering %s %s", type(exc).__name__, request.method, request.url.path)
        return error_response(ApiError(500, "the server hit an internal error answering this request; it is in the "
                                            "server's log", type="server_error", code="internal_error",
                                       headers={"Connection": "close"}))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(ApiError(exc.status_code, str(exc.detail), type=error_type, headers=exc.headers))
