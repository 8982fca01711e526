"""Caps on a request's headers and body, enforced before the app reads them (pure ASGI middleware).

Headers over `max_header_bytes` in all are answered 431 (h11's own cap applies only to headers
that arrive in pieces).

A declared `Content-Length` over the cap is answered 413 at once, without reading a byte of
the body; a chunked body is counted as it streams and answered 413 as soon as it passes the
cap. Either way the connection is closed (the rest of the body is never read). JSON bodies
and multipart uploads (which carry an image) have separate caps.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from ditserve.server.asgi import Receive, Scope, Send, header, send_error

__all__ = ["RequestLimits"]


class RequestLimits:
    """431 for headers over `max_header_bytes`; 413 for a body over `max_body_bytes` (`max_upload_bytes`
    for multipart/form-data)."""

    def __init__(self, app: Any, max_body_bytes: int, max_upload_bytes: int, max_header_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes
        self.max_header_bytes = max_header_bytes

    def _limit(self, scope: Scope) -> tuple[int, str]:
        content_type = (header(scope, b"content-type") or b"").split(b";")[0].strip().lower()
        if content_type == b"multipart/form-data":
            return self.max_upload_bytes, "--max-upload-bytes"
        return self.max_body_bytes, "--max-body-bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ())) > self.max_header_bytes:
            await send_error(send, 431, f"the request headers are larger than this server accepts "
                                        f"({self.max_header_bytes} bytes)", code="headers_too_large", close=True)
            return
        limit, flag = self._limit(scope)

        async def refuse() -> None:
            await send_error(send, 413, f"the request body is larger than this server accepts ({limit} bytes; {flag})",
                             code="body_too_large", close=True)

        length = header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            await refuse()
            return
        received = 0
        refused = False
        started = False

        async def counted_receive() -> MutableMapping[str, Any]:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        await refuse()
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            if refused:
                return  # the 413 is the answer; whatever the app says after it goes nowhere
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:
                raise  # the app's own error; only the one our refusal caused (a disconnect) is ours to drop
