"""HTTP request and response bodies (pydantic), in the style of OpenAI's videos and images APIs.

Request bodies are built per served model from its `RequestSpec` (`request_bodies`): the
family's own parameters (e.g. Wan2.2-A14B's guidance_scale_2) are fields, and the field
descriptions carry the model's defaults and limits.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, create_model

from ditserve.engine import RequestSpec
from ditserve.server.jobs import JobSnapshot

__all__ = [
    "ErrorInfo",
    "ImageData",
    "ImagesResponse",
    "ModelCard",
    "ModelList",
    "request_bodies",
    "VideoDeleted",
    "VideoList",
    "VideoObject",
    "video_object",
]

_STRICT = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


def _described(spec: RequestSpec, name: str, text: str) -> str:
    p = spec.param(name)
    default = "" if p.default is None else f" Default: {p.default}."
    return f"{text} ({p.accepted()}).{default}"


def _common_fields(spec: RequestSpec) -> dict[str, Any]:
    """Fields both bodies take; value rules are the spec's (checked after parsing, answered 400)."""
    fields: dict[str, Any] = {
        "prompt": (str, Field(description=_described(spec, "prompt", "What to generate"))),
        "negative_prompt": (str | None, Field(None, description=_described(spec, "negative_prompt",
                                                                            "What to steer away from"))),
        "model": (str | None, Field(None, description="Must be the served model's id if given (see /v1/models).")),
        "num_inference_steps": (int | None, Field(
            None, validation_alias=AliasChoices("num_inference_steps", "steps"),
            description=_described(spec, "num_inference_steps", "Denoising steps; `steps` is accepted too"))),
        "guidance_scale": (float | None, Field(None, description=_described(spec, "guidance_scale",
                                                                            spec.param("guidance_scale").help))),
        "seed": (int | None, Field(None, description="0 .. 2**64-1; omitted -> a random seed, reported back.")),
        "user": (str | None, Field(None, description="Accepted for OpenAI compatibility and ignored.")),
    }
    for p in spec.extras:
        kind = p.python_type
        fields[p.name] = (kind | None, Field(None, description=_described(spec, p.name, p.help)))
    return fields


def _size_description(spec: RequestSpec) -> str:
    height, width = spec.param("height"), spec.param("width")
    return (f"'WIDTHxHEIGHT' in pixels, e.g. '{width.default}x{height.default}' (the default); width "
            f"{width.accepted().removeprefix('an int, ')}, height {height.accepted().removeprefix('an int, ')}.")


def request_bodies(spec: RequestSpec) -> tuple[type[BaseModel], type[BaseModel]]:
    """The request bodies of POST /v1/videos and POST /v1/images/generations for a model's spec.

    They check shape only: known fields and JSON types (strict: "5" is not 5). A body that
    fails here gets 422; the spec's value rules then give 400 (`admission.py`), so the server
    and the Python API accept exactly the same requests.
    """
    common = _common_fields(spec)
    frames = spec.param("num_frames")
    video = create_model(
        "request_bodies",
        __config__=_STRICT,
        **common,
        size=(str | None, Field(None, description=_size_description(spec))),
        num_frames=(int | None, Field(None, description=_described(spec, "num_frames", "Frames"))),
        seconds=(float | str | None, Field(None, description="Length in seconds (number or numeric string, as "
                                                             "OpenAI sends it); frames = seconds*fps + 1, rounded "
                                                             f"to the model's rule ({frames.accepted()}).")),
        fps=(float | None, Field(None, description=_described(spec, "fps", "Frame rate of the MP4"))),
    )
    image = create_model(
        "ImageGenerationRequest",
        __config__=_STRICT,
        **common,
        size=(str | None, Field(None, description=_size_description(spec))),
        n=(int, Field(1, description="Images per request; only 1 is supported.")),
        response_format=(Literal["b64_json", "url"], "b64_json"),
    )
    return video, image


class ErrorInfo(BaseModel):
    code: str
    message: str


class VideoObject(BaseModel):
    """A video job as GET /v1/videos/{id} shows it; times are Unix seconds."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: Literal["queued", "in_progress", "completed", "failed", "cancelled"]
    progress: int = Field(description="0..100: denoising steps done; 100 once the file is written.")
    created_at: int
    started_at: int | None
    completed_at: int | None
    prompt: str
    negative_prompt: str
    size: str
    seconds: str
    num_frames: int
    fps: float
    num_inference_steps: int
    guidance_scale: float
    seed: int
    parameters: dict[str, Any] = Field(description="The model's own parameters (e.g. guidance_scale_2).")
    step: int = Field(description="Denoising steps finished.")
    total_steps: int
    error: ErrorInfo | None
    timings: dict[str, Any] = Field(description="Seconds per stage (text_encode_s, denoise_s, per_step_s, "
                                                "step_mean_s, decode_s, total_s, save_s, job_s) once completed.")


class VideoList(BaseModel):
    """A page of videos; the next page is `?after=<last_id>` while `has_more`."""

    object: Literal["list"] = "list"
    data: list[VideoObject]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class VideoDeleted(BaseModel):
    """DELETE of a finished video: it and its file are gone."""

    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    seed: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ditserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _unix(t: float | None) -> int | None:
    return None if t is None else int(t)


def video_object(snap: JobSnapshot, model: str) -> VideoObject:
    """The API view of a job snapshot."""
    req = snap.request
    return VideoObject(
        id=snap.id,
        model=model,
        status=snap.status.value,
        progress=snap.progress,
        created_at=int(snap.created_at),
        started_at=_unix(snap.started_at),
        completed_at=_unix(snap.finished_at),
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        size=f"{req.width}x{req.height}",
        seconds=f"{(req.num_frames - 1) / snap.fps:g}",
        num_frames=req.num_frames,
        fps=snap.fps,
        num_inference_steps=req.num_inference_steps,
        guidance_scale=req.guidance_scale,
        seed=req.seed,
        parameters=dict(req.extras),
        step=snap.step,
        total_steps=snap.total_steps,
        error=ErrorInfo(code=snap.error.code, message=snap.error.message) if snap.error else None,
        timings=snap.timings,
    )
