"""Helpers for testing the server over real HTTP: a uvicorn server on a free port in a thread,
and a pipeline wrapper that pauses, counts or fails runs on cue.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI

__all__ = ["GatedPipeline", "serve_in_thread"]


@contextmanager
def serve_in_thread(app: FastAPI, *, startup_timeout: float = 30.0) -> Iterator[str]:
    """Run `app` on 127.0.0.1 (a free port) in a background thread; yield its base URL; stop it after."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


class GatedPipeline:
    """Wraps a pipeline's `run`: counts calls, can hold each step until `gate` is set, and can make
    chosen calls fail mid-way (`fail_on`: call number (1-based) -> exception raised after step 1)."""

    def __init__(self, inner: Any, *, gated: bool = False, fail_on: dict[int, BaseException] | None = None,
                 output_hook: Callable[[int, Any], Any] | None = None) -> None:
        self.inner = inner
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.running = threading.Event()  # set when a run has finished its first step
        self.calls = 0
        self.prompts: list[str] = []  # of every run, in order
        self.fail_on = dict(fail_on or {})
        self.output_hook = output_hook  # (call number, output) -> output, e.g. to inject NaNs
        self._lock = threading.Lock()

    def validate(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.validate(*args, **kwargs)

    def run(self, request: Any, *, callback: Any = None, cancel: Any = None) -> Any:
        with self._lock:
            self.calls += 1
            call = self.calls
            self.prompts.append(request.prompt)
        failure = self.fail_on.get(call)

        def step(i: int, total: int) -> None:
            if failure is not None:
                raise failure
            self.running.set()
            if not self.gate.wait(30):
                raise TimeoutError("GatedPipeline: the test never opened the gate")
            if callback is not None:
                callback(i, total)

        output = self.inner.run(request, callback=step, cancel=cancel)
        return self.output_hook(call, output) if self.output_hook else output
