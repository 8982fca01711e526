"""Limits at the HTTP layer, over real sockets: body size (413 before reading), slow and half-open
clients, header size, and /health answering fast while the engine works."""

from __future__ import annotations

import json
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ditserve.server import ServerSettings, create_app
from helpers.server import serve_in_thread


def settings(tmp_path: Path, **overrides: Any) -> ServerSettings:
    return ServerSettings(**{"model_name": "tiny-wan", "output_dir": tmp_path / "out", **overrides})


@pytest.fixture(scope="module")
def limited(tiny_pipeline: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    limits = settings(tmp_path_factory.mktemp("limits"), max_body_bytes=1000, max_upload_bytes=100_000,
                      request_timeout_s=0.5, keep_alive_timeout_s=1)
    with serve_in_thread(create_app(tiny_pipeline, limits)) as url:
        yield url


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def response_of(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def test_a_declared_oversized_body_is_refused_before_it_is_sent(limited: str) -> None:
    with connect(limited) as sock:
        start = time.monotonic()
        sock.sendall(b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 52428800\r\n\r\n")  # 50 MB announced, not a byte of it sent
        status, headers, body = response_of(read_all(sock))
        assert time.monotonic() - start < 2
    assert status == 413 and headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["code"] == "body_too_large" and "1000 bytes; --max-body-bytes" in error["message"]


def test_a_chunked_body_is_counted_as_it_streams(limited: str) -> None:
    def chunks(n: int) -> Iterator[bytes]:
        yield b'{"prompt": "' + b"x" * n
        yield b'"}'

    with httpx.Client(base_url=limited) as http:
        too_big = http.post("/v1/videos", content=chunks(1200), headers={"content-type": "application/json"})
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "body_too_large"
        small = http.post("/v1/videos", content=chunks(10), headers={"content-type": "application/json"})
        assert small.status_code != 413  # read and answered by the app (here: no size etc. given -> defaults)
        assert http.get("/health").status_code == 200


def test_multipart_uploads_have_their_own_cap(limited: str) -> None:
    with httpx.Client(base_url=limited) as http:
        upload = http.post("/v1/videos", data={"prompt": "a cat"}, files={"input_reference": ("a.png", b"\0" * 5000)})
        assert upload.status_code != 413, upload.text  # over max_body_bytes, under max_upload_bytes
        huge = http.post("/v1/videos", data={"prompt": "a cat"}, files={"input_reference": ("a.png", b"\0" * 200_000)})
        assert huge.status_code == 413 and "--max-upload-bytes" in huge.json()["error"]["message"]


@pytest.mark.parametrize("sent", [
    b"POST /v1/videos HTTP/1.1\r\nHost: x\r\n",  # headers never finished
    b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pr",
    b"",  # connected, then silence
], ids=["partial-headers", "partial-body", "silent"])
def test_a_client_that_stops_sending_is_disconnected(limited: str, sent: bytes) -> None:
    with connect(limited) as sock:
        start = time.monotonic()
        sock.sendall(sent)
        assert read_all(sock) == b""  # closed by the server, no answer
        assert 0.4 < time.monotonic() - start < 5


def test_a_client_dribbling_bytes_is_disconnected(limited: str) -> None:
    with connect(limited) as sock:
        start = time.monotonic()
        sock.settimeout(0.1)
        with pytest.raises(OSError):  # broken pipe / reset once the server has closed
            for byte in b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 100:
                sock.send(bytes([byte]))
                time.sleep(0.05)
                assert time.monotonic() - start < 5
                try:
                    if sock.recv(1) == b"":
                        raise ConnectionResetError("closed")
                except TimeoutError:
                    pass


def test_idle_keep_alive_connections_are_closed_and_big_headers_refused(limited: str) -> None:
    with connect(limited) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        start = time.monotonic()
        status, _, _ = response_of(read_all(sock))  # answered, then closed when idle for 1 s
        assert status == 200 and 0.5 < time.monotonic() - start < 5
    with connect(limited) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        status, _, body = response_of(read_all(sock))
        assert status == 431 and json.loads(body)["error"]["code"] == "headers_too_large"


def test_health_answers_within_50_ms_while_the_engine_generates(tiny_pipeline: Any, tmp_path: Path) -> None:
    with serve_in_thread(create_app(tiny_pipeline, settings(tmp_path))) as url, httpx.Client(base_url=url) as http:
        body = {"prompt": "a long one", "size": "64x64", "num_frames": 17, "steps": 1000, "seed": 0}
        job = http.post("/v1/videos", json=body).json()["id"]
        while http.get(f"/v1/videos/{job}").json()["step"] < 2:  # the engine is stepping
            time.sleep(0.01)
        times = []
        for _ in range(40):
            start = time.perf_counter()
            assert http.get("/health").status_code == 200
            times.append(time.perf_counter() - start)
            time.sleep(0.01)
        assert http.get(f"/v1/videos/{job}").json()["status"] == "in_progress"  # it ran all along
        http.delete(f"/v1/videos/{job}")
    times.sort()
    assert statistics.median(times) < 0.05 and times[int(0.95 * len(times))] < 0.05, times
