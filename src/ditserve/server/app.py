"""`create_app(pipeline or factory, settings)`: the FastAPI app, testable without a command line."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from ditserve import __version__
from ditserve.engine import RequestSpec
from ditserve.server.auth import ApiKeyAuth
from ditserve.server.errors import install_error_handlers
from ditserve.server.request_limits import RequestLimits
from ditserve.server.responses import AsciiJSONResponse
from ditserve.server.routes import build_router
from ditserve.server.schemas import request_bodies
from ditserve.server.settings import ServerSettings
from ditserve.server.state import PipelineSource, ServerState
from ditserve.server.transport import MAX_HEADER_BYTES

__all__ = ["LIMIT_FLAGS", "build_app", "create_app", "served_spec"]

LIMIT_FLAGS = {"max_steps": "--max-steps", "max_frames": "--max-frames", "max_pixels": "--max-pixels"}


def create_app(
    pipeline: PipelineSource,
    settings: ServerSettings | None = None,
    *,
    spec: RequestSpec | None = None,
    on_load_failure: Callable[[BaseException], None] | None = None,
    leader: Any = None,
    on_ranks_lost: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """An app serving `pipeline` (a loaded pipeline, or a no-argument factory run in the background at start).

    spec: the model's request spec; a loaded pipeline's own by default, and required with a
    factory (`ditserve.pipelines.read_request_spec(folder)` reads it without loading). The
    request bodies and defaults come from it. on_load_failure(error) runs (on the loading
    thread) if the factory raises; `serve` exits then. The server state is `app.state.ditserve`.
    With `settings.api_keys`, every route but /health needs a key (`ditserve.server.auth`);
    /openapi.json exists only with `settings.docs`, and there are no interactive docs pages
    (they load scripts from a CDN). `leader`: on rank 0 of several, the `engine.coordination.Leader`
    whose followers run each step with this server's engine; on_ranks_lost(error) runs (on the event loop)
    once a rank has died (`ServerState.ranks_lost`); `serve` exits 1 then.
    """
    if spec is None:
        spec = getattr(pipeline, "request_spec", None)
        if spec is None:
            raise TypeError("create_app needs spec= when given a factory instead of a loaded pipeline")
    settings = settings or ServerSettings()
    return build_app(ServerState(pipeline, settings, served_spec(spec, settings), on_load_failure, leader,
                                 on_ranks_lost))


def served_spec(spec: RequestSpec, settings: ServerSettings) -> RequestSpec:
    """The model's request spec under the operator's limits (`--max-steps`, `--max-frames`, `--max-pixels`)."""
    return spec.with_limits(max_steps=settings.max_steps, max_frames=settings.max_frames,
                            max_pixels=settings.max_pixels, flags=LIMIT_FLAGS)


def build_app(state: Any) -> FastAPI:
    """The FastAPI app around a server state: `ServerState`, or any object with its route-facing methods
    (`ditserve.rayserve.ingress.IngressState`: jobs in a store shared by replicas). The state's `start()`
    and `await stop()` run at the app's start and end; its `settings` and `spec` give the limits and bodies."""
    video_body, image_body = request_bodies(state.spec)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="ditserve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  default_response_class=AsciiJSONResponse,
                  openapi_url="/openapi.json" if state.settings.docs else None,
                  description="Text-to-video and text-to-image generation with diffusion transformers.")
    app.state.ditserve = state
    install_error_handlers(app, {"/v1/videos": video_body, "/v1/images/generations": image_body})
    app.include_router(build_router(video_body, image_body))
    app.add_middleware(ApiKeyAuth, keys=state.settings.api_keys)
    app.add_middleware(RequestLimits, max_body_bytes=state.settings.max_body_bytes,  # outermost: caps what auth drains
                       max_upload_bytes=state.settings.max_upload_bytes, max_header_bytes=MAX_HEADER_BYTES)
    return app
