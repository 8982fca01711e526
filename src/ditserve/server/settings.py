"""Server settings: everything `ditserve serve` can be told, checked once at start."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["ServerSettings"]


@dataclass(frozen=True)
class ServerSettings:
    """model_name: the id /v1/models lists and requests may name.
    output_dir: where finished files go; None -> a temporary folder removed at shutdown.
    max_queue: most jobs accepted and not finished (waiting, in the batch, or being written); one
        more gets 429. A burst of small jobs fits in one batched step, so the default is generous.
    max_batch_size: most jobs admitted to the batch at once (None: no limit, each step is
        bounded by the token budget; 1: one job at a time, each to its end).
    max_batch_tokens: DiT tokens one batched step may hold (None: the engine's default, from
        free device memory; see `ditserve.engine.budget`). A bigger job runs alone.
    keep_jobs: finished jobs (and files) kept; older ones are deleted.
    max_steps / max_frames / max_pixels: limits below the model's own (None: the model's: steps up
        to its scheduler's training steps, frames and sizes up to what its rotary table covers);
        requests beyond them get 400 naming the flag.
    shutdown_timeout_s: how long shutdown (SIGTERM) may take in all: open connections finishing, the
        running jobs stopping at their next step, files of jobs done denoising being written. Under
        Kubernetes' default 30 s grace period by default, so the pod exits before it is killed.
    api_keys: bearer keys; when any is given every endpoint but /health needs one, and each key
        sees only its own jobs (never shown in repr or logs).
    public_url: the server's address as clients reach it (`https://host[:port][/prefix]`), for
        the `url` response format; None -> the address the connection came in on (never the
        client's Host header).
    docs: serve the OpenAPI schema at /openapi.json (no interactive pages, no outside scripts).
    max_body_bytes / max_upload_bytes: largest JSON body / multipart upload (an input image); more
        is answered 413 before it is read.
    request_timeout_s: a client must send a whole request (headers and body) within this, from the
        moment the server waits for it; a slower one is disconnected (no half-open connections).
    keep_alive_timeout_s: an idle keep-alive connection is closed after this.
    """

    model_name: str = "ditserve"
    output_dir: Path | None = None
    max_queue: int = 64
    max_batch_size: int | None = None
    max_batch_tokens: int | None = None
    keep_jobs: int = 100
    max_steps: int | None = None
    max_frames: int | None = None
    max_pixels: int | None = None
    shutdown_timeout_s: float = 25.0
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    public_url: str | None = None
    docs: bool = False
    max_body_bytes: int = 1024 * 1024
    max_upload_bytes: int = 32 * 1024 * 1024
    request_timeout_s: float = 30.0
    keep_alive_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name must be a non-empty string")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        _check_limit("max_batch_size", self.max_batch_size, "1 runs one job at a time")
        _check_limit("max_batch_tokens", self.max_batch_tokens, "leave it out for the default from free memory")
        for name in ("max_steps", "max_frames", "max_pixels"):
            _check_limit(name, getattr(self, name), "leave it out for the model's own limit")
        if self.keep_jobs < 1:
            raise ValueError(f"keep_jobs must be >= 1, got {self.keep_jobs}")
        if not (isinstance(self.shutdown_timeout_s, int | float) and 0 < self.shutdown_timeout_s < float("inf")):
            raise ValueError(f"shutdown_timeout_s (--shutdown-timeout) must be a number of seconds > 0, "
                             f"got {self.shutdown_timeout_s!r}")
        _check_limit("max_body_bytes", self.max_body_bytes, "--max-body-bytes; the default is 1 MiB")
        _check_limit("max_upload_bytes", self.max_upload_bytes, "--max-upload-bytes; the default is 32 MiB")
        for name, flag in (("request_timeout_s", "--request-timeout"), ("keep_alive_timeout_s", "--keep-alive-timeout")):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value < float("inf")):
                raise ValueError(f"{name} ({flag}) must be a number of seconds > 0, got {value!r}")
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        if self.public_url is not None:
            object.__setattr__(self, "public_url", _check_public_url(self.public_url))
        if self.output_dir is not None:
            object.__setattr__(self, "output_dir", Path(self.output_dir))
            if self.output_dir.exists() and not self.output_dir.is_dir():
                raise ValueError(f"output_dir {self.output_dir} exists and is not a folder")


def _check_limit(name: str, value: int | None, hint: str) -> None:
    """None or a positive int: the engine's limits, refused here before the model loads."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 ({hint}), got {value}")


def _check_public_url(url: str) -> str:
    """`http(s)://host[:port][/prefix]` without a trailing slash; ValueError naming the flag otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"public_url (--public-url) must be an http:// or https:// URL with a host, got {url!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"public_url (--public-url) must have no query, fragment or user info, got {url!r}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"public_url (--public-url) has an invalid port: {url!r}") from None
    return url.rstrip("/")
