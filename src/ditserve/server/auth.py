"""API keys: who may call the server, and whose jobs a caller may see.

With any key configured, every request except `GET /health` must carry
`Authorization: Bearer <key>`; anything else is answered 401 (with `WWW-Authenticate: Bearer`)
before the app parses the request. The presented token is hashed and compared with
`hmac.compare_digest` against every key's hash, so the time taken says nothing about how much
of a key was right. A job is owned by the key that created it: the store keeps `owner_id(key)`,
a one-way hash, never the key itself. Without keys, nobody is asked and every caller sees
every job (owner None).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from pathlib import Path

from starlette.requests import Request

from ditserve.server.asgi import Receive, Scope, Send, drain, header, may_have_body, send_error

__all__ = ["ENV_VAR", "MIN_KEY_LENGTH", "ApiKeyAuth", "load_api_keys", "owner_id", "request_owner"]

ENV_VAR = "DITSERVE_API_KEYS"
MIN_KEY_LENGTH = 16
OPEN_PATHS = frozenset({"/health"})  # an orchestrator's probe carries no key
_OWNER_KEY = "ditserve.owner"  # in the ASGI scope


def owner_id(key: str) -> str:
    """The owner a key's jobs are stored under: a hash, useless as a key if the job database leaks."""
    return hashlib.sha256(b"ditserve job owner\0" + key.encode()).hexdigest()


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(b"ditserve api key\0" + token).digest()


def check_key(key: str, source: str) -> str:
    """`key` if it is usable, else ValueError naming where it came from."""
    if len(key) < MIN_KEY_LENGTH:
        raise ValueError(f"{source}: an API key must be at least {MIN_KEY_LENGTH} characters, got {len(key)}")
    if any(c.isspace() for c in key) or not key.isprintable() or not key.isascii():
        raise ValueError(f"{source}: an API key must be printable ASCII without spaces")
    return key


def load_api_keys(keys: Iterable[str] = (), files: Iterable[str | os.PathLike[str]] = (),
                  env: str | None = None) -> tuple[str, ...]:
    """Keys from `--api-key` values, `--api-key-file` files (one per line; blank lines and `#` comments
    skipped) and `$DITSERVE_API_KEYS` (comma-separated), checked, duplicates dropped, in order."""
    found = [check_key(k, "--api-key") for k in keys]
    for file in files:
        try:
            lines = Path(file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--api-key-file {file}: cannot read it ({e})") from None
        found += [check_key(line.strip(), f"--api-key-file {file} line {i}") for i, line in enumerate(lines, 1)
                  if line.strip() and not line.lstrip().startswith("#")]
        if not any(line.strip() and not line.lstrip().startswith("#") for line in lines):
            raise ValueError(f"--api-key-file {file}: no keys in it (one key per line)")
    if env:
        found += [check_key(k.strip(), f"${ENV_VAR}") for k in env.split(",") if k.strip()]
    return tuple(dict.fromkeys(found))


def request_owner(request: Request) -> str | None:
    """The owner id of the key the request authenticated with; None when the server has no keys."""
    return request.scope.get(_OWNER_KEY)


class ApiKeyAuth:
    """Pure ASGI middleware: a bearer key on every request but `/health`; the owner id into the scope."""

    def __init__(self, app: object, keys: Iterable[str]) -> None:
        self.app = app
        self._keys = [(_digest(k.encode()), owner_id(k)) for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._keys or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)  # type: ignore[operator]
            return
        owner = self._owner(header(scope, b"authorization"))
        if owner is None:
            if may_have_body(scope):
                await drain(receive)
            given = header(scope, b"authorization") is not None
            await send_error(send, 401, "invalid API key: send 'Authorization: Bearer <key>' with a key this server "
                                        "was given (--api-key)" if given else
                             "missing API key: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return
        scope[_OWNER_KEY] = owner
        await self.app(scope, receive, send)  # type: ignore[operator]

    def _owner(self, authorization: bytes | None) -> str | None:
        if authorization is None:
            return None
        scheme, _, token = authorization.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return None
        presented = _digest(token.strip())
        owner = None
        for digest, key_owner in self._keys:  # every key, always: no early exit
            if hmac.compare_digest(presented, digest):
                owner = key_owner
        return owner
