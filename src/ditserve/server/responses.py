"""JSON responses that always encode: ASCII with escapes, so no string a client sent (a lone
surrogate, which UTF-8 cannot encode) can make a response, or every later listing, fail."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse

__all__ = ["AsciiJSONResponse"]


class AsciiJSONResponse(JSONResponse):
    """`JSONResponse` with `ensure_ascii=True` (non-ASCII as \\u escapes: valid JSON, same text once parsed)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")
