"""Turning a request body into a validated job, with the pipeline's own rules, before anything is queued.

Every rejection is an `InvalidRequest` naming the field as the client sent it (`size`,
`seconds`, `n`), so the error says what to change; the server answers it with 400.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Mapping
from typing import Any

from ditserve.engine import InvalidRequest
from ditserve.server.execute import ServablePipeline
from ditserve.server.jobs import Job
from ditserve.server.schemas import ImageGenerationRequest, VideoCreateRequest
from ditserve.server.settings import ServerSettings

__all__ = ["ModelNotServed", "image_job", "parse_size", "video_job"]

_SIZE = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*")
RANDOM_SEED_BOUND = 2**32  # random seeds stay short enough to type back in


class ModelNotServed(InvalidRequest):
    """The request names a model this server does not serve (404, as OpenAI answers)."""


def parse_size(size: str) -> tuple[int, int]:
    """'832x480' -> (width=832, height=480)."""
    match = _SIZE.fullmatch(size)
    if not match:
        raise InvalidRequest("size", f"size must be 'WIDTHxHEIGHT' in pixels, e.g. '832x480', got {size!r}")
    return int(match[1]), int(match[2])


def _check_model(model: str | None, served: str) -> None:
    if model is not None and model != served:
        raise ModelNotServed("model", f"model {model!r} is not served here; this server serves {served!r} "
                                      "(see GET /v1/models), or leave model out")


def _positive_number(field: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise InvalidRequest(field, f"{field} must be a positive number, got {value!r}")
    return number


def _frames_and_fps(body: VideoCreateRequest, default_fps: float) -> tuple[int | None, float, str | None]:
    """(num_frames or None for the default, fps, how frames were derived from seconds, for messages).

    `seconds` alone (as OpenAI's clients send it) means seconds at the server's default fps.
    """
    fps = default_fps if body.fps is None else _positive_number("fps", body.fps)
    if body.seconds is None:
        return body.num_frames, fps, None
    if body.num_frames is not None:
        raise InvalidRequest("seconds", "give either num_frames or seconds (with fps), not both")
    seconds = _positive_number("seconds", body.seconds)
    frames = round(seconds * fps) + 1
    return frames, fps, f"seconds={seconds:g} at fps={fps:g} gives {frames} frames"


def _validated(pipeline: ServablePipeline, fields: dict[str, Any], size: str | None, derived: str | None,
               defaults: Mapping[str, Any]) -> Any:
    """`pipeline.validate` with errors re-addressed to the fields the client sent (size, seconds).

    Fields the client left out take `defaults` (the server's), then the pipeline's own."""
    if size is not None:
        fields["width"], fields["height"] = parse_size(size)
    if fields.get("seed") is None:
        fields["seed"] = secrets.randbelow(RANDOM_SEED_BOUND)
    given = {**defaults, **{k: v for k, v in fields.items() if v is not None}}
    try:
        return pipeline.validate(**given)
    except InvalidRequest as e:
        if size is not None and e.field in ("height", "width"):
            raise InvalidRequest("size", f"size {size!r}: {e}") from None
        if derived is not None and e.field == "num_frames":
            raise InvalidRequest("seconds", f"{derived}; {e}") from None
        raise


def video_job(body: VideoCreateRequest, pipeline: ServablePipeline, settings: ServerSettings) -> Job:
    _check_model(body.model, settings.model_name)
    num_frames, fps, derived = _frames_and_fps(body, settings.default_fps)
    request = _validated(pipeline, {
        "prompt": body.prompt, "negative_prompt": body.negative_prompt, "num_frames": num_frames,
        "num_inference_steps": body.num_inference_steps, "guidance_scale": body.guidance_scale, "seed": body.seed,
    }, body.size, derived, settings.request_defaults)
    return Job(kind="video", request=request, fps=fps)


def image_job(body: ImageGenerationRequest, pipeline: ServablePipeline, settings: ServerSettings) -> Job:
    _check_model(body.model, settings.model_name)
    if body.n != 1:
        raise InvalidRequest("n", f"n must be 1 (one image per request), got {body.n}; "
                                   "send several requests for several images")
    request = _validated(pipeline, {
        "prompt": body.prompt, "negative_prompt": body.negative_prompt, "num_frames": 1,
        "num_inference_steps": body.num_inference_steps, "guidance_scale": body.guidance_scale, "seed": body.seed,
    }, body.size, None, settings.request_defaults)
    return Job(kind="image", request=request, fps=1.0)
