"""API keys, job ownership, URLs that never trust the Host header, and docs off by default (real HTTP)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from ditserve.server import ServerSettings, create_app
from ditserve.server.auth import load_api_keys, owner_id
from helpers.server import serve_in_thread

KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"
SMALL = {"size": "32x32", "num_frames": 1, "steps": 1, "seed": 1}


def settings(tmp_path: Path, **overrides: Any) -> ServerSettings:
    return ServerSettings(**{"model_name": "tiny-wan", "output_dir": tmp_path / "out", **overrides})


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_for(http: httpx.Client, job_id: str, headers: dict[str, str]) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while (job := http.get(f"/v1/videos/{job_id}", headers=headers).json())["status"] not in (
            "completed", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return job


@pytest.fixture(scope="module")
def keyed_server(tiny_pipeline: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("auth")
    with serve_in_thread(create_app(tiny_pipeline, settings(tmp, api_keys=(KEY_A, KEY_B)))) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        video = http.post("/v1/videos", json={"prompt": "a's video", **SMALL}, headers=bearer(KEY_A)).json()["id"]
        assert wait_for(http, video, bearer(KEY_A))["status"] == "completed"
        image = http.post("/v1/images/generations", json={"prompt": "a's image", "size": "32x32", "steps": 1,
                                                          "response_format": "url"}, headers=bearer(KEY_A))
        yield http, url, video, image.json()["data"][0]["url"], tmp / "out"


def _endpoints(video: str, image_url: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    return [("GET", "/v1/models", None), ("GET", "/v1/videos", None), ("GET", f"/v1/videos/{video}", None),
            ("GET", f"/v1/videos/{video}/content", None), ("GET", image_url, None), ("GET", "/metrics", None),
            ("POST", "/v1/videos", {"prompt": "x", **SMALL}),
            ("POST", "/v1/images/generations", {"prompt": "x", "size": "32x32", "steps": 1}),
            ("DELETE", "/v1/videos/video_nope", None), ("GET", "/openapi.json", None), ("GET", "/v2/nothing", None)]


@pytest.mark.parametrize("credentials", [None, "Bearer wrong-key-0123456789abcdef", f"Basic {KEY_A}", "Bearer",
                                         f"Bearer {KEY_A}x", f"bearer {KEY_A[:-1]}"])
def test_every_endpoint_but_health_needs_a_valid_key(keyed_server: Any, credentials: str | None) -> None:
    http, _, video, image_url, _ = keyed_server
    headers = {} if credentials is None else {"Authorization": credentials}
    for method, path, body in _endpoints(video, image_url):
        response = http.request(method, path, json=body, headers=headers)
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key" and "Authorization: Bearer <key>" in error["message"]
    assert http.get("/health").status_code == 200  # probes carry no key


def test_a_key_sees_and_deletes_only_its_own_jobs(keyed_server: Any) -> None:
    http, _, video, image_url, out = keyed_server
    for key in (KEY_A, KEY_B):
        assert http.get("/v1/models", headers=bearer(key)).status_code == 200
        assert http.get("/metrics", headers=bearer(key)).status_code == 200
    assert [v["id"] for v in http.get("/v1/videos", headers=bearer(KEY_A)).json()["data"]] == [video]
    assert http.get("/v1/videos", headers=bearer(KEY_B)).json()["data"] == []
    for method, path in [("GET", f"/v1/videos/{video}"), ("GET", f"/v1/videos/{video}/content"),
                         ("GET", image_url), ("DELETE", f"/v1/videos/{video}")]:
        other = http.request(method, path, headers=bearer(KEY_B))
        assert other.status_code == 404 and other.json()["error"]["code"] == "not_found", (method, path)
    assert http.get(f"/v1/videos/{video}/content", headers=bearer(KEY_A)).status_code == 200
    assert http.get(image_url, headers=bearer(KEY_A)).headers["content-type"] == "image/png"
    # the job database holds a hash of the key, never the key
    with sqlite3.connect(out / ".ditserve" / "jobs.sqlite3") as db:
        owners = {row[0] for row in db.execute("SELECT owner FROM jobs")}
    assert owners == {owner_id(KEY_A)}
    stored = b"".join(p.read_bytes() for p in (out / ".ditserve").iterdir() if p.is_file())
    assert KEY_A.encode() not in stored and KEY_B.encode() not in stored


def test_urls_come_from_the_bind_address_or_public_url_never_the_host_header(tiny_pipeline: Any,
                                                                              tmp_path: Path) -> None:
    body = {"prompt": "a cat", "size": "32x32", "steps": 1, "response_format": "url"}
    with serve_in_thread(create_app(tiny_pipeline, settings(tmp_path))) as url, httpx.Client(base_url=url) as http:
        made = http.post("/v1/images/generations", json=body, headers={"Host": "evil.example:666"})
        assert made.status_code == 200, made.text
        assert made.json()["data"][0]["url"].startswith(f"{url}/v1/files/img_")
    public = settings(tmp_path, public_url="https://gen.example.com/api/")
    with serve_in_thread(create_app(tiny_pipeline, public)) as url, httpx.Client(base_url=url) as http:
        made = http.post("/v1/images/generations", json=body, headers={"Host": "evil.example:666"}).json()
        assert made["data"][0]["url"].startswith("https://gen.example.com/api/v1/files/img_")
    for bad in ("gen.example.com", "ftp://gen.example.com", "https://gen.example.com/?a=1", "https://u:p@host",
                "https://host:99999"):
        with pytest.raises(ValueError, match="--public-url"):
            settings(tmp_path, public_url=bad)


def test_docs_are_off_unless_asked_and_never_load_outside_scripts(tiny_pipeline: Any, tmp_path: Path) -> None:
    with serve_in_thread(create_app(tiny_pipeline, settings(tmp_path))) as url, httpx.Client(base_url=url) as http:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
            assert http.get(path).status_code == 404, path
    with serve_in_thread(create_app(tiny_pipeline, settings(tmp_path, docs=True))) as url, \
            httpx.Client(base_url=url) as http:
        schema = http.get("/openapi.json")
        assert schema.status_code == 200 and "/v1/videos" in schema.json()["paths"]
        assert http.get("/docs").status_code == 404 and http.get("/redoc").status_code == 404


def test_keys_from_flags_files_and_the_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# team keys\n{KEY_A}\n\n  {KEY_B}  \n")
    third = "key-c-0123456789abcdef"
    assert load_api_keys([KEY_A], [keys], f" {third}, ,{KEY_A}") == (KEY_A, KEY_B, third)
    with pytest.raises(ValueError, match="--api-key: an API key must be at least 16 characters, got 5"):
        load_api_keys(["short"])
    with pytest.raises(ValueError, match=r"\$DITSERVE_API_KEYS: an API key must be printable ASCII"):
        load_api_keys(env="key-with-\u00e9-0123456789")
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no keys in it"):
        load_api_keys(files=[tmp_path / "empty"])
    with pytest.raises(ValueError, match="cannot read it"):
        load_api_keys(files=[tmp_path / "missing"])
    assert "key-a" not in repr(ServerSettings(api_keys=(KEY_A,)))  # never in logs

    from ditserve.cli import main

    assert main(["serve", "--model", str(tmp_path), "--api-key-file", str(tmp_path / "missing")]) == 2
    assert "--api-key-file" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--public-url", "gen.example.com"]) == 2
    assert "public_url (--public-url) must be an http:// or https:// URL" in capsys.readouterr().err
