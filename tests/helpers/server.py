"""Helpers for testing the server over real HTTP: a uvicorn server on a free port in a thread,
and a pipeline wrapper that pauses, counts or fails batched steps on cue.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from ditserve.server.transport import uvicorn_config

__all__ = ["GatedPipeline", "free_port", "serve_in_thread", "source_env", "wait_healthy"]

SRC = Path(__file__).resolve().parents[2] / "src"


def free_port() -> int:
    """A TCP port free on loopback now (for a server or torchrun's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def source_env(**extra: str) -> dict[str, str]:
    """The environment for a `ditserve` subprocess run from this checkout: src first on PYTHONPATH, one
    intra-op thread (2 cores shared by several processes)."""
    return {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1", **extra}


def wait_healthy(proc: subprocess.Popen, http: Any, timeout: float = 60.0) -> None:
    """Poll `GET /health` until 200; fail with the server's output if it exits, or at `timeout`."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        try:
            if http.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(0.1)


@contextmanager
def serve_in_thread(app: FastAPI, *, startup_timeout: float = 30.0) -> Iterator[str]:
    """Run `app` on 127.0.0.1 (a free port) in a background thread, with the transport limits of its
    settings (as `serve` runs it); yield its base URL; stop it after."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings = app.state.ditserve.settings
    server = uvicorn.Server(uvicorn_config(app, settings, log_level="warning", timeout_graceful_shutdown=10))
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
    """Wraps a pipeline's stages as the batching engine calls them, to steer a server under test.

    - `gated=True`: every batched step waits (before its forward) until `gate` is set;
      `running` is set once a step has started, i.e. jobs are in the batch.
    - `calls` / `prompts`: requests the engine admitted (`prepare`), in order; a job
      cancelled or refused before admission never appears.
    - `batch_sizes`: samples in each forward (a guided request is two).
    - `fail_forward` / `fail_decode`: number (1-based) of the batched forward / of the request
      in the order its latents first reach the VAE -> exception raised there (a forward
      failure fails every job in that step; a decode failure only the job being decoded,
      which has finished denoising: a batched decode that fails is retried one by one).
    - `decoded`: every request's decoded frames, in order; `output_hook(number, frames) ->
      frames` can change them (e.g. inject NaNs).
    """

    def __init__(self, inner: Any, *, gated: bool = False, fail_forward: dict[int, BaseException] | None = None,
                 fail_decode: dict[int, BaseException] | None = None,
                 output_hook: Callable[[int, Any], Any] | None = None) -> None:
        self.inner = inner
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.running = threading.Event()
        self.calls = 0
        self.prompts: list[str] = []
        self.batch_sizes: list[int] = []
        self.decoded: list[Any] = []
        self.fail_forward = dict(fail_forward or {})
        self.fail_decode = dict(fail_decode or {})
        self.output_hook = output_hook
        self._lock = threading.Lock()
        self._decode_numbers: dict[Any, int] = {}

    def __getattr__(self, name: str) -> Any:  # request_spec, device, tokens_per_step, final_latents, ...
        return getattr(self.inner, name)

    def prepare_batch(self, requests: Any) -> Any:
        with self._lock:
            self.calls += len(requests)
            self.prompts.extend(r.prompt for r in requests)
        return self.inner.prepare_batch(requests)

    def predict(self, samples: list[Any], interrupt: Any = None) -> list[Any]:
        self.running.set()
        if not self.gate.wait(30):
            raise TimeoutError("GatedPipeline: the test never opened the gate")
        self.batch_sizes.append(len(samples))
        failure = self.fail_forward.get(len(self.batch_sizes))
        if failure is not None:
            raise failure
        return self.inner.predict(samples, interrupt)

    def decode_batch(self, latents: Any) -> Any:
        numbers = [self._decode_number(row) for row in latents]
        failure = next((self.fail_decode[n] for n in numbers if n in self.fail_decode), None)
        if failure is not None:  # the engine's decoder then retries each request alone
            raise failure
        frames = self.inner.decode_batch(latents)
        if self.output_hook:
            frames = [self.output_hook(n, f) for n, f in zip(numbers, frames)]
        self.decoded.extend(frames)
        return frames

    def _decode_number(self, latents: Any) -> int:
        """1-based order in which a request's latents first reached the VAE (stable across retries)."""
        key = latents.double().sum().item(), latents.double().abs().sum().item(), tuple(latents.shape)
        with self._lock:
            return self._decode_numbers.setdefault(key, len(self._decode_numbers) + 1)
