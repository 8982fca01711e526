"""The HTTP endpoints. Handlers are `async` and never block: generation runs on the batching engine's thread."""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse

from ditserve.server.admission import image_job, video_job
from ditserve.server.auth import request_owner
from ditserve.server.errors import ApiError
from ditserve.server.jobs import Job, JobSnapshot, JobStatus
from ditserve.server.metrics import CONTENT_TYPE
from ditserve.server.responses import AsciiJSONResponse
from ditserve.server.schemas import (
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    VideoCreateRequest,
    VideoList,
    VideoObject,
    video_object,
)
from ditserve.server.state import ServerState

__all__ = ["router"]

router = APIRouter()

_MEDIA_TYPES = {".mp4": "video/mp4", ".png": "image/png"}


def _state(request: Request) -> ServerState:
    return request.app.state.ditserve


State = Annotated[ServerState, Depends(_state)]


async def _wait_finished(job: Job) -> JobSnapshot:
    """Wait (without blocking the loop) until the job is finished; its snapshot."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()

    def wake(_: Job) -> None:
        loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))

    job.on_finish(wake)
    await finished
    return job.snapshot()


def _visible(state: ServerState, job: Job, request: Request) -> bool:
    """Without API keys every job is everyone's; with keys, a job is its creator's key's alone."""
    return not state.settings.api_keys or job.owner == request_owner(request)


def _find(state: ServerState, request: Request, job_id: str, kind: str | None) -> Job:
    """The job `job_id` (of `kind`, if given) if the caller may see it, or 404 (another key's job is
    answered as if it did not exist)."""
    job = state.store.get(job_id)
    if job is None or (kind is not None and job.kind != kind) or not _visible(state, job, request):
        raise ApiError(404, f"no {kind or 'file'} with id {job_id!r} (never created, or deleted after "
                            f"{state.settings.keep_jobs} newer jobs finished)",
                       param="video_id" if kind == "video" else "file_id", code="not_found")
    return job


def _file(snap: JobSnapshot) -> FileResponse:
    if snap.status is not JobStatus.COMPLETED or snap.path is None:
        detail = f" ({snap.error.message})" if snap.error else ""
        raise ApiError(409, f"{snap.id} is {snap.status.value}{detail}; its content exists only once it is "
                            "completed", code="not_ready" if not snap.status.finished else f"job_{snap.status.value}")
    if not snap.path.is_file():
        raise ApiError(404, f"the file of {snap.id} was deleted", code="not_found")
    return FileResponse(snap.path, media_type=_MEDIA_TYPES.get(snap.path.suffix, "application/octet-stream"),
                        filename=snap.path.name)


def _base_url(request: Request, state: ServerState) -> str:
    """Where clients reach this server: `--public-url`, else the local address the connection came in
    on. Never the request's Host header, which the client chooses."""
    if state.settings.public_url is not None:
        return state.settings.public_url
    server = request.scope.get("server")
    if not server or server[1] is None:  # a Unix socket: no address a client could use
        raise ApiError(400, "this server has no network address to build a URL from; use response_format "
                            "'b64_json', or start it with --public-url", param="response_format", code="no_public_url")
    host, port = server
    host = f"[{host}]" if ":" in host else host
    return f"{request.scope.get('scheme', 'http')}://{host}:{port}{request.scope.get('root_path', '')}"


# -- videos -----------------------------------------------------------------------------------

@router.post("/v1/videos", response_model=VideoObject, tags=["videos"])
async def create_video(body: VideoCreateRequest, request: Request, state: State) -> VideoObject:
    """Create a video job; returns at once with status `queued` (poll GET /v1/videos/{id})."""
    job = video_job(body, state.pipeline(), state.settings)
    job.owner = request_owner(request)
    state.admit(job)
    return video_object(job.snapshot(), state.settings.model_name)


@router.get("/v1/videos", response_model=VideoList, tags=["videos"])
async def list_videos(request: Request, state: State) -> VideoList:
    """Your video jobs, newest first."""
    jobs = [j for j in reversed(state.store.jobs()) if j.kind == "video" and _visible(state, j, request)]
    return VideoList(data=[video_object(j.snapshot(), state.settings.model_name) for j in jobs])


@router.get("/v1/videos/{video_id}", response_model=VideoObject, tags=["videos"])
async def get_video(video_id: str, request: Request, state: State) -> VideoObject:
    return video_object(_find(state, request, video_id, "video").snapshot(), state.settings.model_name)


@router.get("/v1/videos/{video_id}/content", tags=["videos"], response_class=FileResponse)
async def video_content(video_id: str, request: Request, state: State) -> FileResponse:
    """The MP4 of a completed job (409 before that)."""
    return _file(_find(state, request, video_id, "video").snapshot())


@router.delete("/v1/videos/{video_id}", response_model=VideoObject, tags=["videos"])
async def cancel_video(video_id: str, request: Request, state: State) -> VideoObject:
    """Cancel a queued job (answered `cancelled`) or a running one (answered `in_progress`: it stops
    before its next denoising step, and GET then shows `cancelled`). A finished job gives 409."""
    job = _find(state, request, video_id, "video")
    if not state.runner.cancel(video_id):
        raise ApiError(409, f"{video_id} is already {job.status.value}; only queued or in_progress jobs can be "
                            "cancelled", code="not_cancellable")
    return video_object(job.snapshot(), state.settings.model_name)


# -- images -----------------------------------------------------------------------------------

@router.post("/v1/images/generations", response_model=ImagesResponse, response_model_exclude_none=True,
             tags=["images"])
async def generate_image(body: ImageGenerationRequest, request: Request, state: State) -> ImagesResponse:
    """Generate one image (a single-frame run) and answer when it is done."""
    job = image_job(body, state.pipeline(), state.settings)
    job.owner = request_owner(request)
    state.admit(job)
    snap = await _wait_finished(job)
    if snap.status is JobStatus.CANCELLED:
        raise ApiError(503, f"the image was not made: {snap.error.message if snap.error else 'cancelled'}",
                       type="server_error", code="cancelled")
    if snap.status is not JobStatus.COMPLETED or snap.path is None:
        error = snap.error
        raise ApiError(500, f"generation failed: {error.message if error else 'unknown error'}",
                       type="server_error", code=error.code if error else "generation_failed")
    seed = snap.request.seed
    if body.response_format == "url":
        url = f"{_base_url(request, state)}/v1/files/{snap.id}/content"
        return ImagesResponse(created=int(snap.created_at), data=[ImageData(url=url, seed=seed)])
    try:
        data = await asyncio.to_thread(snap.path.read_bytes)
    except FileNotFoundError:
        raise ApiError(500, "the image was deleted before it could be returned; raise --keep-jobs",
                       type="server_error", code="deleted") from None
    return ImagesResponse(created=int(snap.created_at),
                          data=[ImageData(b64_json=base64.b64encode(data).decode("ascii"), seed=seed)])


@router.get("/v1/files/{file_id}/content", name="file_content", tags=["images"], response_class=FileResponse)
async def file_content(file_id: str, request: Request, state: State) -> FileResponse:
    """The file of any completed job of yours (images' `url` points here)."""
    return _file(_find(state, request, file_id, None).snapshot())


# -- service ----------------------------------------------------------------------------------

@router.get("/health", tags=["service"])
async def health(state: State) -> AsciiJSONResponse:
    """200 when a request can be generated; 503 while loading, after a failed load, or shutting down."""
    if state.ready:
        stats = state.runner.stats()
        return AsciiJSONResponse({"status": "ok", "model": state.settings.model_name, "queued": stats.queued,
                             "running": stats.running})
    if state.draining:
        status = {"status": "shutting_down"}
    elif state.load_error is not None:
        status = {"status": "failed", "error": state.load_error}
    else:
        status = {"status": "loading"}
    return AsciiJSONResponse(status, status_code=503)


@router.get("/v1/models", response_model=ModelList, tags=["service"])
async def models(state: State) -> ModelList:
    return ModelList(data=[ModelCard(id=state.settings.model_name, created=int(state.started_at))])


@router.get("/metrics", tags=["service"])
async def metrics(state: State) -> Response:
    """Prometheus text format."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
