"""The HTTP transport settings of a server: uvicorn's config with time and size limits on clients.

uvicorn drops an idle keep-alive connection after `timeout_keep_alive`, and h11 refuses
headers over `h11_max_incomplete_event_size`; but a connection that sends part of a request
and then nothing (or a byte now and then) is held for ever. `TimedH11Protocol` gives every
request `request_timeout_s` from the moment the server waits for it (connection opened, or
the previous response sent) to its last body byte; a client slower than that is disconnected.
The time the app takes to answer does not count.

It also turns Nagle's algorithm off on every connection. asyncio does that itself only for
sockets created with `proto=IPPROTO_TCP`, and uvicorn's sockets (its own, or one passed in)
have proto 0: a response's body then waits behind its headers for the client's delayed ACK,
about 40 ms on every keep-alive request after the first.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ditserve.server.settings import ServerSettings

__all__ = ["MAX_HEADER_BYTES", "timed_h11_protocol", "uvicorn_config"]

MAX_HEADER_BYTES = 16 * 1024  # request line and headers; more -> 400


def timed_h11_protocol(request_timeout_s: float) -> type[H11Protocol]:
    """An h11 protocol class that disconnects a client not sending its request within `request_timeout_s`."""

    class TimedH11Protocol(H11Protocol):
        _read_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            self._arm()  # waiting for the next request now (a pipelined one already here disarms it below)
            super().on_response_complete()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
                self._disarm()  # the whole request is in; the app's time is not the client's

        def _arm(self) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self._read_timer = self.loop.call_later(request_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _too_slow(self) -> None:
            self._read_timer = None
            if not self.transport.is_closing():
                self.logger.info("dropping a client that did not send its request within %g s", request_timeout_s)
                self.transport.close()

    return TimedH11Protocol


def uvicorn_config(app: Any, settings: ServerSettings, **kwargs: Any) -> uvicorn.Config:
    """`uvicorn.Config` for `app` with the client limits of `settings`; `kwargs` as uvicorn takes them."""
    return uvicorn.Config(app, http=timed_h11_protocol(settings.request_timeout_s),
                          timeout_keep_alive=max(1, round(settings.keep_alive_timeout_s)),
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES, **kwargs)
