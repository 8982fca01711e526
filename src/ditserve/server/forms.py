"""A request body as JSON or as a multipart/urlencoded form, validated by the same pydantic body model.

OpenAI's clients send `POST /v1/videos` as multipart/form-data (so that `input_reference` can
be a file); curl users send JSON. Both become one dict, checked by the route's body model, so
the rules and the error messages (422 for shape, via `RequestValidationError`) are the same.
Form fields are all strings: a field the model types as a number (and not also as a string)
takes a numeric string as that number; JSON stays strict ("5" is not 5). Fields OpenAI's
clients may send that mean nothing here (`user`) are dropped. A file part is accepted only
for the fields named in `file_fields`, and returned as bytes, apart from the model.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from ditserve.server.errors import ApiError

__all__ = ["FORM_TYPES", "ParsedBody", "read_body"]

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
IGNORED_FIELDS = ("user",)  # OpenAI's end-user id: optional, and nothing here uses it
_INT = re.compile(r"[+-]?\d{1,30}")
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")

Body = TypeVar("Body", bound=BaseModel)


@dataclass
class ParsedBody:
    """`fields`: the validated body; `files`: bytes of file parts by field; `references`: file fields given
    as something other than a file (a JSON object, a form string), for the route to refuse."""

    fields: Any
    files: dict[str, bytes] = field(default_factory=dict)
    references: set[str] = field(default_factory=set)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _numeric_kinds(model: type[BaseModel]) -> dict[str, type]:
    """Field name or alias -> int or float, for fields typed as a number and not also as a string."""
    kinds: dict[str, type] = {}
    for name, info in model.model_fields.items():
        args = set(typing.get_args(info.annotation)) if isinstance(info.annotation, types.UnionType) or \
            typing.get_origin(info.annotation) is typing.Union else {info.annotation}
        if str in args:
            continue
        kind = int if int in args else float if float in args else None
        if kind is None:
            continue
        alias = info.validation_alias
        for key in (name, *(getattr(alias, "choices", ()) or ())):
            kinds[str(key)] = kind
    return kinds


def _coerced(value: str, kind: type | None) -> Any:
    """A form string as the number its field takes, when it reads as one; else unchanged (the model refuses it)."""
    text = value.strip()
    if kind is int and _INT.fullmatch(text):
        return int(text)
    if kind is float and _FLOAT.fullmatch(text):
        return float(text)
    return value


async def _form_fields(request: Request, model: type[BaseModel], file_fields: Collection[str]) -> ParsedBody:
    kinds = _numeric_kinds(model)
    data: dict[str, Any] = {}
    parsed = ParsedBody(fields=None)
    async with request.form(max_files=len(file_fields) or 1, max_fields=64) as form:
        for key, value in form.multi_items():
            base = key.split("[", 1)[0]  # `input_reference[image_url]`: a reference object, form-encoded
            if key in data or key in parsed.files:
                raise ApiError(422, f"{key}: given more than once", param=key, code="invalid_body")
            if isinstance(value, UploadFile):
                if key not in file_fields:
                    raise ApiError(422, f"{key}: a file is not accepted here"
                                        f"{'; only ' + ', '.join(file_fields) + ' takes a file' if file_fields else ''}",
                                   param=key, code="invalid_body")
                parsed.files[key] = await value.read()
            elif base in file_fields:
                parsed.references.add(base)
            else:
                data[key] = _coerced(value, kinds.get(key))
    parsed.fields = data
    return parsed


async def _json_fields(request: Request, file_fields: Collection[str]) -> ParsedBody:
    raw = await request.body()
    if not raw.strip():
        return ParsedBody(fields=None)  # the model says: the body must be a JSON object
    try:
        data = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        reason = getattr(e, "msg", None) or str(e)
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", getattr(e, "pos", 0)),
                                       "msg": "JSON decode error", "input": {}, "ctx": {"error": reason}}]) from None
    parsed = ParsedBody(fields=data)
    if isinstance(data, dict):
        parsed.references = {key for key in file_fields if data.pop(key, None) is not None}
    return parsed


async def read_body(request: Request, model: type[Body], *, file_fields: Collection[str] = ()) -> ParsedBody:
    """The request's body (JSON, or a form) validated by `model`; 422 `RequestValidationError` if it does not fit."""
    if _media_type(request) in FORM_TYPES:
        parsed = await _form_fields(request, model, file_fields)
    else:
        parsed = await _json_fields(request, file_fields)
    if isinstance(parsed.fields, dict):
        for key in IGNORED_FIELDS:
            parsed.fields.pop(key, None)
    try:
        parsed.fields = model.model_validate(parsed.fields)
    except ValidationError as e:
        raise RequestValidationError([{**error, "loc": ("body", *error["loc"])}
                                      for error in e.errors(include_url=False)]) from None
    return parsed
