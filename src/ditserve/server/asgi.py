"""Answering from a pure ASGI middleware, before the app (and its body parsing) runs.

The middlewares that refuse a request early (a missing API key, a body over the limit) answer
with the same OpenAI-style error body the routes use, having read the body (`drain`) or, when
it is too big to read, closing the connection.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

__all__ = ["Receive", "Scope", "Send", "drain", "header", "may_have_body", "send_error"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header `name` (lower case) in an http scope, or None."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


def may_have_body(scope: Scope) -> bool:
    """True unless the request says it has no body (no Content-Length, or 0, and no chunked encoding)."""
    length = header(scope, b"content-length")
    return header(scope, b"transfer-encoding") is not None or (length is not None and length.strip() != b"0")


async def drain(receive: Receive) -> None:
    """Read and drop the request body, so the connection can answer and stay open (closing a socket with
    unread data resets it, and the client may lose the answer). Bounded by the body-size middleware."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def send_error(send: Send, status: int, message: str, *, code: str, type: str = "invalid_request_error",
                     param: str | None = None, headers: Mapping[str, str] | None = None, close: bool = False) -> None:
    """One complete JSON error response `{"error": {message, type, param, code}}`."""
    body = json.dumps({"error": {"message": message, "type": type, "param": param, "code": code}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
