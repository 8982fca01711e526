"""HTTP request and response bodies (pydantic), in the style of OpenAI's videos and images APIs.

Request bodies check shape only: known fields, JSON types (strict: "5" is not 5, true is
not 1). A body that fails here gets 422. Value rules (sizes, frame counts, steps, guidance,
seed) belong to the pipeline's `validate`, applied in `admission.py` (400), so the server
and the Python API accept exactly the same requests.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from ditserve.server.jobs import JobSnapshot

__all__ = [
    "ErrorInfo",
    "ImageData",
    "ImageGenerationRequest",
    "ImagesResponse",
    "ModelCard",
    "ModelList",
    "VideoCreateRequest",
    "VideoDeleted",
    "VideoList",
    "VideoObject",
    "video_object",
]

_STEPS = Field(
    default=None,
    validation_alias=AliasChoices("num_inference_steps", "steps"),
    description="Denoising steps (>= 1); `steps` is accepted as a short name. Default: 50.",
)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class VideoCreateRequest(_Body):
    """POST /v1/videos. Give the length as `num_frames`, or as `seconds` (frames = seconds*fps + 1)."""

    prompt: str
    negative_prompt: str | None = None
    model: str | None = Field(None, description="Must be the served model's id if given (see /v1/models).")
    size: str | None = Field(None, description="'WIDTHxHEIGHT' in pixels, e.g. '832x480' (the default).")
    num_frames: int | None = Field(None, description="Frames, of the form 4k+1 for Wan (default 81).")
    seconds: float | str | None = Field(None, description="Length in seconds (number or numeric string, as OpenAI "
                                                           "sends it); frames = seconds*fps + 1.")
    fps: float | None = Field(None, description="Frame rate of the MP4 (default 16).")
    num_inference_steps: int | None = _STEPS
    guidance_scale: float | None = Field(None, description="Classifier-free guidance, >= 0 (default 5.0).")
    seed: int | None = Field(None, description="0 .. 2**64-1; omitted -> a random seed, reported back.")


class ImageGenerationRequest(_Body):
    """POST /v1/images/generations: one frame, returned in the response."""

    prompt: str
    negative_prompt: str | None = None
    model: str | None = None
    n: int = Field(1, description="Images per request; only 1 is supported.")
    size: str | None = Field(None, description="'WIDTHxHEIGHT' in pixels (default '832x480').")
    response_format: Literal["b64_json", "url"] = "b64_json"
    num_inference_steps: int | None = _STEPS
    guidance_scale: float | None = None
    seed: int | None = None


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
        step=snap.step,
        total_steps=snap.total_steps,
        error=ErrorInfo(code=snap.error.code, message=snap.error.message) if snap.error else None,
        timings=snap.timings,
    )
