"""Turning a request body into a validated job, with the served model's `RequestSpec`, before anything is queued.

Every rejection is an `InvalidRequest` naming the field as the client sent it (`size`,
`seconds`, `n`), so the error says what to change; the server answers it with 400.
Fields the client leaves out take the model's defaults (the spec's, which a model folder's
`request_defaults.json` may set).
"""

from __future__ import annotations

import math
import re
import secrets
from typing import Any

from pydantic import BaseModel

from ditserve.engine import GenerationRequest, InvalidRequest, RequestSpec
from ditserve.server.jobs import Job
from ditserve.server.settings import ServerSettings

__all__ = ["ModelNotServed", "image_job", "parse_size", "video_job"]

_SIZE = re.compile(r"\s*(\d{1,9})\s*[xX]\s*(\d{1,9})\s*")
RANDOM_SEED_BOUND = 2**32  # random seeds stay short enough to type back in
_NOT_REQUEST_FIELDS = ("model", "size", "seconds", "user", "n", "response_format")


class ModelNotServed(InvalidRequest):
    """The request names a model this server does not serve (404, as OpenAI answers)."""


def parse_size(size: str) -> tuple[int, int]:
    """'832x480' -> (width=832, height=480)."""
    match = _SIZE.fullmatch(size) if len(size) <= 64 else None
    if not match:
        raise InvalidRequest("size", f"size must be 'WIDTHxHEIGHT' in pixels, e.g. '832x480', got {size[:64]!r}")
    return int(match[1]), int(match[2])


def _check_model(model: str | None, served: str) -> None:
    if model is not None and model != served:
        raise ModelNotServed("model", f"model {model[:200]!r} is not served here; this server serves {served!r} "
                                      "(see GET /v1/models), or leave model out")


def _seconds(value: float | str) -> float:
    try:
        number = float(value) if not isinstance(value, str) or len(value) <= 32 else math.nan
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and 0 < number <= 3600):
        raise InvalidRequest("seconds", f"seconds must be a number in (0, 3600], got {str(value)[:32]!r}")
    return number


def _frames_from_seconds(seconds: float, fps: float, spec: RequestSpec) -> tuple[int, str]:
    """The frame count nearest to seconds*fps + 1 that the model takes, and how it was derived."""
    frames = spec.param("num_frames")
    wanted = seconds * fps + 1
    k = max(0, round((wanted - frames.offset) / frames.multiple))
    count = k * frames.multiple + frames.offset
    return count, f"seconds={seconds:g} at fps={fps:g} gives {count} frames"


def _validated(spec: RequestSpec, body: BaseModel, fields: dict[str, Any], derived: str | None,
               image: bytes | None = None) -> GenerationRequest:
    """`spec.validate` with errors re-addressed to the fields the client sent (size, seconds)."""
    given = {k: v for k, v in body.model_dump().items() if k not in _NOT_REQUEST_FIELDS and v is not None}
    given.update({k: v for k, v in fields.items() if v is not None})
    size = getattr(body, "size", None)
    if size is not None:
        given["width"], given["height"] = parse_size(size)
    if given.get("seed") is None:
        given["seed"] = secrets.randbelow(RANDOM_SEED_BOUND)
    try:
        return spec.validate(given, image=image)
    except InvalidRequest as e:
        if size is not None and e.field in ("height", "width"):
            raise InvalidRequest("size", f"size {size!r}: {e}") from None
        if derived is not None and e.field == "num_frames":
            raise InvalidRequest("seconds", f"{derived}; {e}") from None
        if e.field == "image":
            raise InvalidRequest("input_reference", f"input_reference: {e}") from None
        raise


def video_job(body: BaseModel, spec: RequestSpec, settings: ServerSettings, *, image: bytes | None = None) -> Job:
    """A video job; `image`: the encoded first frame (`input_reference`) for a model that takes one."""
    _check_model(body.model, settings.model_name)
    if spec.output != "video":
        raise InvalidRequest("model", f"{settings.model_name} makes images, not videos: use POST "
                                      "/v1/images/generations")
    fields: dict[str, Any] = {}
    derived = None
    if body.seconds is not None:
        if body.num_frames is not None:
            raise InvalidRequest("seconds", "give either num_frames or seconds (with fps), not both")
        fps = spec.param("fps").check(body.fps if body.fps is not None else spec.param("fps").default)
        fields["num_frames"], derived = _frames_from_seconds(_seconds(body.seconds), fps, spec)
    request = _validated(spec, body, fields, derived, image)
    return Job(kind="video", request=request, fps=request.fps)


def image_job(body: BaseModel, spec: RequestSpec, settings: ServerSettings) -> Job:
    _check_model(body.model, settings.model_name)
    if body.n != 1:
        raise InvalidRequest("n", f"n must be 1 (one image per request), got {body.n}; "
                                   "send several requests for several images")
    request = _validated(spec, body, {"num_frames": 1}, None)
    return Job(kind="image", request=request, fps=1.0)
