"""The HTTP endpoints. Handlers are `async` and never block: generation runs on the batching engine's thread.

They reach jobs only through the state's awaitable methods (`admit`, `find`, `jobs`, `cancel`, `remove`,
`finished`, `render_metrics`; `stats` for /health), so one set of routes serves one process
(`ditserve.server.state.ServerState`) and many replicas behind Ray Serve (`ditserve.rayserve.ingress`).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel

from ditserve.engine import RequestSpec
from ditserve.server.admission import image_job, video_job
from ditserve.server.auth import request_owner
from ditserve.server.errors import ApiError
from ditserve.server.forms import ParsedBody, read_body
from ditserve.server.jobs import Job, JobSnapshot, JobStatus
from ditserve.server.metrics import CONTENT_TYPE
from ditserve.server.responses import AsciiJSONResponse
from ditserve.server.schemas import (
    ImageData,
    ImagesResponse,
    ModelCard,
    ModelList,
    VideoDeleted,
    VideoList,
    VideoObject,
    video_object,
)
from ditserve.server.state import ServerState

__all__ = ["build_router"]

log = logging.getLogger("ditserve.server")

_MEDIA_TYPES = {".mp4": "video/mp4", ".png": "image/png"}


def _state(request: Request) -> ServerState:
    return request.app.state.ditserve


State = Annotated[ServerState, Depends(_state)]


DISCONNECT_POLL_S = 0.2  # how often a synchronous request checks that its client is still there


async def _wait_finished(state: ServerState, job: Job, request: Request) -> JobSnapshot | None:
    """Wait (without blocking the loop) until the job is finished: its snapshot; None if the client
    disconnected first (nobody is left to answer)."""
    finished = asyncio.ensure_future(state.finished(job))
    try:
        while True:
            done, _ = await asyncio.wait({finished}, timeout=DISCONNECT_POLL_S)
            if done:
                return finished.result()
            if await request.is_disconnected():
                return None
    finally:
        finished.cancel()


def _visible(state: ServerState, job: Job, request: Request) -> bool:
    """Without API keys every job is everyone's; with keys, a job is its creator's key's alone."""
    return not state.settings.api_keys or job.owner == request_owner(request)


async def _find(state: ServerState, request: Request, job_id: str, kind: str | None) -> Job:
    """The job `job_id` (of `kind`, if given) if the caller may see it, or 404 (another key's job is
    answered as if it did not exist)."""
    job = await state.find(job_id)
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


def _body_doc(model: type[Any], *, form: bool = False, file_fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """OpenAPI `requestBody` for a route that reads its body itself (JSON, or also a form)."""
    schema = model.model_json_schema()
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if form:
        properties = {**schema.get("properties", {}), **{f: {"type": "string", "format": "binary"} for f in file_fields}}
        content["multipart/form-data"] = {"schema": {**schema, "properties": properties}}
    return {"requestBody": {"required": True, "content": content}}


def _input_image(parsed: ParsedBody, spec: RequestSpec) -> bytes | None:
    """The `input_reference` upload for a model that takes an image; 400 if the model takes none or
    it was not sent as a file. A family declares whether it takes one (`RequestSpec.takes_image`)."""
    if "input_reference" not in parsed.files and "input_reference" not in parsed.references:
        return None
    if not spec.takes_image:
        raise ApiError(400, "this model does not take an input image; leave input_reference out",
                       param="input_reference", code="invalid_value")
    data = parsed.files.get("input_reference")
    if data is None:
        raise ApiError(400, "input_reference: send the image as a file part of a multipart/form-data request",
                       param="input_reference", code="invalid_value")
    if not data:
        raise ApiError(400, "input_reference: the file is empty", param="input_reference", code="invalid_value")
    return data


def build_router(video_body: type[BaseModel], image_body: type[BaseModel]) -> APIRouter:
    """The endpoints, reading request bodies with the served model's models (`schemas.request_bodies`)."""
    router = APIRouter()

    # -- videos -----------------------------------------------------------------------------------

    @router.post("/v1/videos", response_model=VideoObject, tags=["videos"],
                 openapi_extra=_body_doc(video_body, form=True, file_fields=("input_reference",)))
    async def create_video(request: Request, state: State) -> VideoObject:
        """Create a video job (a JSON body, or multipart/form-data as OpenAI's clients send it, with an optional
        `input_reference` image file); returns at once with status `queued` (poll GET /v1/videos/{id})."""
        parsed = await read_body(request, video_body, file_fields=("input_reference",))
        state.pipeline()  # 503 unless loaded
        image = _input_image(parsed, state.spec)
        job = video_job(parsed.fields, state.spec, state.settings, image=image)
        job.owner = request_owner(request)
        await state.admit(job)
        return video_object(job.snapshot(), state.settings.model_name)


    @router.get("/v1/videos", response_model=VideoList, tags=["videos"])
    async def list_videos(request: Request, state: State, after: str | None = None,
                          limit: Annotated[int, Query(ge=1, le=100)] = 20,
                          order: Literal["asc", "desc"] = "desc") -> VideoList:
        """Your video jobs, newest first (`order=asc`: oldest first), `limit` at a time; the next page starts
        `after` the previous page's `last_id`."""
        jobs = [j for j in await state.jobs() if j.kind == "video" and _visible(state, j, request)]
        if order == "desc":
            jobs.reverse()
        if after is not None:
            index = next((i for i, j in enumerate(jobs) if j.id == after), None)
            if index is None:
                raise ApiError(400, f"after: no video with id {after!r} to list after (never created, deleted, or "
                                    "not yours)", param="after", code="invalid_value")
            jobs = jobs[index + 1:]
        page = [video_object(j.snapshot(), state.settings.model_name) for j in jobs[:limit]]
        return VideoList(data=page, has_more=len(jobs) > limit, first_id=page[0].id if page else None,
                         last_id=page[-1].id if page else None)


    @router.get("/v1/videos/{video_id}", response_model=VideoObject, tags=["videos"])
    async def get_video(video_id: str, request: Request, state: State) -> VideoObject:
        return video_object((await _find(state, request, video_id, "video")).snapshot(), state.settings.model_name)


    @router.get("/v1/videos/{video_id}/content", tags=["videos"], response_class=FileResponse)
    async def video_content(video_id: str, request: Request, state: State, variant: str = "video") -> FileResponse:
        """The MP4 of a completed job (409 before that). `variant`: only `video` exists here."""
        job = await _find(state, request, video_id, "video")
        if variant != "video":
            raise ApiError(400, f"variant: only 'video' is available here, got {variant!r}", param="variant",
                           code="invalid_value")
        return _file(job.snapshot())


    @router.delete("/v1/videos/{video_id}", response_model=VideoObject | VideoDeleted, tags=["videos"])
    async def delete_video(video_id: str, request: Request, state: State) -> VideoObject | VideoDeleted:
        """A finished job (completed, failed or cancelled) is deleted with its file, as OpenAI deletes a video
        (answered `{"id", "object": "video.deleted", "deleted": true}`). A queued job is cancelled (answered
        `cancelled`), a running one asked to stop (answered `in_progress`: it stops before its next denoising
        step, GET then shows `cancelled`, and a second DELETE deletes it)."""
        job = await _find(state, request, video_id, "video")
        cancelled = await state.cancel(job)
        if cancelled is not None:
            return video_object(cancelled, state.settings.model_name)
        if not await state.remove(job):
            raise ApiError(409, f"{video_id} is {job.status.value} and cannot be deleted yet; try again",
                           code="not_deletable")
        return VideoDeleted(id=video_id)


    # -- images -----------------------------------------------------------------------------------

    @router.post("/v1/images/generations", response_model=ImagesResponse, response_model_exclude_none=True,
                 tags=["images"], openapi_extra=_body_doc(image_body))
    async def generate_image(request: Request, state: State) -> ImagesResponse | Response:
        """Generate one image (a single-frame run) and answer when it is done. A client that disconnects
        first cancels its job."""
        body = (await read_body(request, image_body)).fields
        state.pipeline()  # 503 unless loaded
        job = image_job(body, state.spec, state.settings)
        job.owner = request_owner(request)
        await state.admit(job)
        snap = await _wait_finished(state, job, request)
        if snap is None:  # the client went away: stop its image rather than make it for nobody
            await state.cancel(job)
            log.info("job %s: cancelled, its client disconnected", job.id)
            return Response(status_code=499)  # nginx's "client closed request"; nobody receives it
        if snap.status is JobStatus.CANCELLED:
            raise ApiError(503, f"the image was not made: {snap.error.message if snap.error else 'cancelled'}",
                           type="server_error", code="cancelled")
        if snap.status is not JobStatus.COMPLETED or snap.path is None:
            error = snap.error
            if error is not None and error.code == "invalid_request":  # a limit only the loaded model knows
                raise ApiError(400, error.message, param=error.message.partition(":")[0], code="invalid_value")
            if error is not None and error.code == "rank_failed":  # the server's failure, not this request's
                raise ApiError(503, f"the image was not made: {error.message}", type="server_error",
                               code=error.code)
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
        return _file((await _find(state, request, file_id, None)).snapshot())


    # -- service ----------------------------------------------------------------------------------

    @router.get("/health", tags=["service"])
    async def health(state: State) -> AsciiJSONResponse:
        """200 when a request can be generated; 503 while loading, after a failed load, after a rank died, or
        shutting down."""
        if state.ready:
            stats = state.stats()
            return AsciiJSONResponse({"status": "ok", "model": state.settings.model_name, "queued": stats.queued,
                                 "running": stats.running})
        failure = getattr(state, "failure", None)  # a rank died (a server on several ranks)
        if failure is not None:
            status = {"status": "failed", "error": f"{failure}: the server is stopping", "code": "rank_failed"}
        elif state.draining:
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
        return Response(await state.render_metrics(), media_type=CONTENT_TYPE)

    return router
