"""Helpers for testing ditserve on Ray Serve: a local Ray cluster with Serve's HTTP proxy on a free port,
an application deployed on the embedded tiny model, and HTTP helpers that submit and wait for jobs."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ditserve.rayserve.application import build_application, start_hub
from ditserve.rayserve.launch import stop_application
from ditserve.rayserve.messages import ClusterView
from ditserve.rayserve.options import HUB_NAMESPACE, RayOptions
from helpers.server import free_port

__all__ = ["Deployed", "deployed", "local_cluster", "submit", "wait_finished", "wait_for"]

FAST_AUTOSCALING = {"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}


@contextmanager
def local_cluster(num_cpus: int) -> Iterator[str]:
    """A local Ray cluster (`num_cpus` logical CPUs, no dashboard) with Serve listening on a free loopback port;
    yields the base URL. Serve's autoscaler hears queue lengths every 0.5 s (Ray's default is 10 s)."""
    import ray
    from ray import serve

    saved = {name: os.environ.get(name) for name in FAST_AUTOSCALING}
    os.environ.update(FAST_AUTOSCALING)
    ray.init(num_cpus=num_cpus, include_dashboard=False, namespace=HUB_NAMESPACE, log_to_driver=False,
             logging_level="WARNING")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass
class Deployed:
    """An application under test: its HTTP client, its job hub (a Ray actor) and options."""

    http: httpx.Client
    hub: Any
    options: RayOptions
    output_dir: Path

    def view(self) -> ClusterView:
        import ray

        return ray.get(self.hub.view.remote())

    def running_replicas(self) -> int:
        """Generator replicas Serve reports RUNNING."""
        from ray import serve

        deployment = serve.status().applications[self.options.app_name].deployments["Generator"]
        return deployment.replica_states.get("RUNNING", 0)


@contextmanager
def deployed(url: str, output_dir: Path, options: RayOptions, *, headers: dict[str, str] | None = None,
             **settings: Any) -> Iterator[Deployed]:
    """The application on the embedded tiny model (no warm-up), with `settings` for `ServerSettings`; the
    client sends `headers` (an API key) with every request."""
    from ray import serve

    from ditserve.pipelines import read_request_spec
    from ditserve.server.app import served_spec
    from ditserve.server.settings import ServerSettings
    from ditserve.tiny.embedded import default_model_path

    model = str(default_model_path())
    server_settings = ServerSettings(model_name="tiny-wan", output_dir=output_dir, **settings)
    hub, token = start_hub(server_settings, options)
    app = build_application(model, server_settings, options, served_spec(read_request_spec(model), server_settings),
                            token, load={}, warm=False)
    try:
        serve.run(app, name=options.app_name, route_prefix="/")
        with httpx.Client(base_url=url, timeout=60, headers=headers) as http:
            yield Deployed(http, hub, options, output_dir)
    finally:
        stop_application(options.app_name, hub, 10.0)


def submit(http: httpx.Client, n: int, **body: Any) -> list[str]:
    """Create `n` video jobs (seeds 0..n-1) and return their ids; every one must be accepted."""
    ids = []
    for i in range(n):
        response = http.post("/v1/videos", json={"prompt": "a red circle moving left on a blue background",
                                                 "seed": i, **body})
        assert response.status_code == 200, response.text
        ids.append(response.json()["id"])
    return ids


def wait_finished(http: httpx.Client, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Poll the job list until every job in `ids` is finished; their video objects by id."""
    deadline = time.monotonic() + timeout
    while True:
        listed = {v["id"]: v for v in http.get("/v1/videos", params={"limit": 100}).json()["data"]}
        missing = [i for i in ids if i not in listed]
        assert not missing, f"jobs lost from the store: {missing}"
        if all(listed[i]["status"] in ("completed", "failed", "cancelled") for i in ids):
            return {i: listed[i] for i in ids}
        assert time.monotonic() < deadline, {i: listed[i]["status"] for i in ids}
        time.sleep(0.2)


def wait_for(condition: Any, timeout: float, what: str, period: float = 0.2) -> Any:
    """Poll `condition()` until it returns something truthy (returned); fail naming `what` at `timeout`."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(period)
    return value
