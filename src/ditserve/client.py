"""A small Python client for `ditserve serve` (httpx; no torch needed).

    from ditserve.client import Client
    with Client("http://127.0.0.1:30000") as client:
        video = client.create_video("a red ball rolling", size="832x480", num_frames=81, seed=1)
        client.wait(video["id"], timeout=600)
        client.download(video["id"], "ball.mp4")
        png = client.generate_image("a red ball", size="512x512")

Every server error is raised as `APIError` with the server's message, field (`param`) and
HTTP status; a full queue as `QueueFullError` with the server's Retry-After; a job that
ends failed or cancelled as `JobFailed` with its reason.
"""

from __future__ import annotations

import base64
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

__all__ = ["APIError", "Client", "ClientError", "JobFailed", "QueueFullError", "ServerUnreachable",
           "write_file_atomically"]

DEFAULT_URL = "http://127.0.0.1:30000"
FINISHED = ("completed", "failed", "cancelled")


class ClientError(Exception):
    """Base of every error this client raises."""


class ServerUnreachable(ClientError):
    """No HTTP answer (server not running, wrong URL, network down)."""


class APIError(ClientError):
    """The server answered with an error status; `message` and `param` are the server's."""

    def __init__(self, status_code: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code, self.message, self.param, self.code = status_code, message, param, code


class QueueFullError(APIError):
    """429: the server's queue is full; try again after `retry_after` seconds."""

    def __init__(self, status_code: int, message: str, *, retry_after: float, **kwargs: Any) -> None:
        super().__init__(status_code, message, **kwargs)
        self.retry_after = retry_after


class JobFailed(ClientError):
    """A job ended `failed` or `cancelled`; `job` is its last state as the server reported it."""

    def __init__(self, job: dict[str, Any]) -> None:
        error = job.get("error") or {}
        super().__init__(f"{job.get('id')} {job.get('status')}: {error.get('message', 'no reason given')}")
        self.job = job


def write_file_atomically(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to a hidden temp file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _drop_none(fields: dict[str, Any]) -> dict[str, Any]:
    """Only what the caller set, so the server's defaults apply to the rest."""
    return {k: v for k, v in fields.items() if v is not None}


class Client:
    """Talks to one ditserve server. `timeout`: seconds per HTTP call (image generation waits for the image);
    `api_key`: sent as a bearer token, for a server started with keys."""

    def __init__(self, url: str = DEFAULT_URL, *, timeout: float = 600.0, http: httpx.Client | None = None,
                 api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = http or httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- plumbing --------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise ServerUnreachable(f"cannot reach the ditserve server at {self.url}: {e}") from e
        if response.is_error:
            raise self._error(response)
        return response

    @staticmethod
    def _error(response: httpx.Response) -> APIError:
        try:
            error = response.json().get("error") or {}
        except ValueError:
            error = {}
        message = error.get("message") or response.text or response.reason_phrase
        kwargs = {"param": error.get("param"), "code": error.get("code")}
        if response.status_code == 429:
            retry = response.headers.get("Retry-After", "1")
            return QueueFullError(429, message, retry_after=float(retry) if retry.isdigit() else 1.0, **kwargs)
        return APIError(response.status_code, message, **kwargs)

    # -- service ---------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """The /health body; raises APIError(503) while loading or shutting down."""
        return self._request("GET", "/health").json()

    def wait_ready(self, timeout: float = 300.0, poll_interval: float = 0.5) -> dict[str, Any]:
        """Poll /health until the model is loaded (or raise TimeoutError)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.health()
            except (APIError, ServerUnreachable) as e:
                if isinstance(e, APIError) and e.status_code != 503:
                    raise
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.url} not ready after {timeout:.0f} s: {e}") from e
            time.sleep(poll_interval)

    def models(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/models").json()["data"]

    # -- videos ----------------------------------------------------------------------------

    def create_video(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        size: str | None = None,
        num_frames: int | None = None,
        seconds: float | None = None,
        fps: float | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        """Queue a video; returns the video object (status `queued`). Unset fields take the server's defaults."""
        body = _drop_none(dict(prompt=prompt, negative_prompt=negative_prompt, size=size, num_frames=num_frames,
                               seconds=seconds, fps=fps, num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale, seed=seed, model=model))
        return self._request("POST", "/v1/videos", json=body).json()

    def get(self, video_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/videos/{video_id}").json()

    def list_videos(self) -> list[dict[str, Any]]:
        """Every video of yours the server holds, newest first (all pages)."""
        videos: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 100}
        while True:
            page = self._request("GET", "/v1/videos", params=params).json()
            videos += page["data"]
            if not page.get("has_more") or not page.get("last_id"):
                return videos
            params["after"] = page["last_id"]

    def wait(self, video_id: str, timeout: float = 600.0, poll_interval: float = 0.25,
             on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the job finishes; return it if completed, raise JobFailed if failed or cancelled.

        on_update(job) sees every polled state (e.g. to draw progress from job["step"]).
        """
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(video_id)
            if on_update is not None:
                on_update(job)
            if job["status"] == "completed":
                return job
            if job["status"] in FINISHED:
                raise JobFailed(job)
            if time.monotonic() > deadline:
                progress = job.get("progress", 0)
                raise TimeoutError(f"{video_id} still {job['status']} ({progress}%) after {timeout:.0f} s")
            time.sleep(poll_interval)

    def download(self, video_id: str, path: str | os.PathLike[str]) -> Path:
        """Write the job's MP4 to `path` atomically (a temp file in the same folder, then a rename)."""
        return self._download(f"/v1/videos/{video_id}/content", Path(path))

    def cancel(self, video_id: str) -> dict[str, Any]:
        """DELETE the job: a queued or running one is cancelled (returns the video object); a finished one is
        deleted with its file, as OpenAI's API does (returns `{"id", "object": "video.deleted", "deleted": true}`)."""
        return self._request("DELETE", f"/v1/videos/{video_id}").json()

    delete = cancel

    def _download(self, url: str, path: Path) -> Path:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    with self._http.stream("GET", url) as response:
                        if response.is_error:
                            response.read()
                            raise self._error(response)
                        for chunk in response.iter_bytes():
                            out.write(chunk)
                except httpx.TransportError as e:
                    raise ServerUnreachable(f"download from {self.url}{url} failed: {e}") from e
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    # -- images ----------------------------------------------------------------------------

    def generate_image(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        size: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        model: str | None = None,
        response_format: str = "b64_json",
    ) -> bytes:
        """Generate one image and return its PNG bytes (waits for it; fetched from the URL for "url")."""
        body = _drop_none(dict(prompt=prompt, negative_prompt=negative_prompt, size=size,
                               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
                               model=model, response_format=response_format))
        item = self._request("POST", "/v1/images/generations", json=body).json()["data"][0]
        if item.get("b64_json") is not None:
            return base64.b64decode(item["b64_json"])
        return self._request("GET", item["url"]).content
