"""`create_app(pipeline or factory, settings)`: the FastAPI app, testable without a command line."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ditserve import __version__
from ditserve.server.errors import install_error_handlers
from ditserve.engine import RequestSpec
from ditserve.server.routes import build_router
from ditserve.server.schemas import request_bodies
from ditserve.server.settings import ServerSettings
from ditserve.server.state import PipelineSource, ServerState

__all__ = ["create_app"]


def create_app(
    pipeline: PipelineSource,
    settings: ServerSettings | None = None,
    *,
    spec: RequestSpec | None = None,
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """An app serving `pipeline` (a loaded pipeline, or a no-argument factory run in the background at start).

    spec: the model's request spec; a loaded pipeline's own by default, and required with a
    factory (`ditserve.pipelines.read_request_spec(folder)` reads it without loading). The
    request bodies and defaults come from it. on_load_failure(error) runs (on the loading
    thread) if the factory raises; `serve` exits then. The server state is `app.state.ditserve`.
    """
    if spec is None:
        spec = getattr(pipeline, "request_spec", None)
        if spec is None:
            raise TypeError("create_app needs spec= when given a factory instead of a loaded pipeline")
    state = ServerState(pipeline, settings or ServerSettings(), spec, on_load_failure)
    video_body, image_body = request_bodies(spec)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="ditserve", version=__version__, lifespan=lifespan,
                  description="Text-to-video and text-to-image generation with diffusion transformers.")
    app.state.ditserve = state
    install_error_handlers(app, {"/v1/videos": video_body, "/v1/images/generations": image_body})
    app.include_router(build_router(video_body, image_body))
    return app
