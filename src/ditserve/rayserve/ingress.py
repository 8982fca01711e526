"""The HTTP front on Ray Serve: `ditserve serve`'s own app (routes, schemas, validation, limits, auth,
errors; `ditserve.server.app.build_app`) over a state whose jobs live in the job hub.

Ingress replicas keep no job state: each request reads or writes the hub, so any ingress replica
answers for any job, whichever generator replica ran it, and its file is served from the shared
output folder. /health and the readiness it reports come from a view of the cluster refreshed
in the background (`REFRESH_S`), so /health never waits on the hub or a replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

from ditserve.engine import RequestSpec
from ditserve.rayserve.messages import ClusterView
from ditserve.rayserve.options import HUB_NAMESPACE
from ditserve.rayserve.shared_folder import check_marker
from ditserve.server.errors import ApiError
from ditserve.server.jobs import Job, JobSnapshot
from ditserve.server.settings import ServerSettings
from ditserve.server.stats import RunnerStats

__all__ = ["REFRESH_S", "IngressState"]

log = logging.getLogger("ditserve.rayserve")

REFRESH_S = 1.0
T = TypeVar("T")


class IngressState:
    """What the routes call (`ditserve.server.routes`), answered by the job hub `hub_name`.

    settings / spec: the server's settings and the model's request spec under its limits (the same
    objects `create_app` builds); no model is loaded here. `min_replicas`: with 0 (scale to zero)
    the endpoint is ready without a live replica, since jobs wait in the hub until one starts.
    """

    def __init__(self, settings: ServerSettings, spec: RequestSpec, hub_name: str, min_replicas: int = 1) -> None:
        self.settings = settings
        self.spec = spec
        self.started_at = time.time()
        self.draining = False
        self.load_error: str | None = None
        self._hub_name = hub_name
        self._min_replicas = min_replicas
        self._hub: Any = None
        self._view: ClusterView | None = None
        self._refresher: asyncio.Task[None] | None = None

    # -- life (the app's lifespan) -------------------------------------------------------------

    def start(self) -> None:
        import ray

        self._hub = ray.get_actor(self._hub_name, namespace=HUB_NAMESPACE)
        self._refresher = asyncio.get_running_loop().create_task(self._refresh())

    async def stop(self) -> None:
        self.draining = True
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher

    async def _refresh(self) -> None:
        while True:
            try:
                self._view = await self._hub.view.remote()
            except Exception:  # the hub restarting: keep the last view, say why in the log
                log.warning("cannot reach the job hub", exc_info=True)
            await asyncio.sleep(REFRESH_S)

    # -- what the routes call ----------------------------------------------------------------

    @property
    def ready(self) -> bool:
        if self.draining or self._view is None:
            return False
        return self._view.live_replicas > 0 or self._min_replicas == 0

    def pipeline(self) -> None:
        """503 while shutting down. Jobs are accepted while replicas start: they wait in the hub."""
        if self.draining:
            raise ApiError(503, "the server is shutting down and takes no new jobs", type="server_error",
                           code="shutting_down")

    def stats(self) -> RunnerStats:
        if self._view is None:
            return RunnerStats(queued=0, running=0, capacity=0, mean_job_s=None)
        return self._view.stats

    async def admit(self, job: Job) -> None:
        admission = await self._call(self._hub.submit.remote(job.snapshot()))
        if not admission.accepted:
            headers = {"Retry-After": str(max(1, round(admission.retry_after_s)))} if admission.retry_after_s else None
            raise ApiError(admission.status, admission.message,
                           type="rate_limit_error" if admission.status == 429 else "server_error",
                           code=admission.code, headers=headers)

    async def find(self, job_id: str) -> Job | None:
        snap = await self._call(self._hub.get.remote(job_id))
        return Job.restored(snap) if snap is not None else None

    async def jobs(self) -> list[Job]:
        return [Job.restored(snap) for snap in await self._call(self._hub.list.remote())]

    async def cancel(self, job: Job) -> JobSnapshot | None:
        return await self._call(self._hub.cancel.remote(job.id))

    async def remove(self, job: Job) -> bool:
        return await self._call(self._hub.remove.remote(job.id))

    async def finished(self, job: Job) -> JobSnapshot:
        snap = await self._call(self._hub.wait.remote(job.id))
        if snap is None:  # deleted while we waited: nothing to return
            raise ApiError(503, f"{job.id} was deleted before it finished", type="server_error", code="deleted")
        return snap

    async def render_metrics(self) -> bytes:
        return await self._call(self._hub.render_metrics.remote())

    async def _call(self, call: Awaitable[T]) -> T:
        """A hub call; 503 (retry) while the hub is unreachable (restarting), never a 500."""
        from ray.exceptions import RayActorError

        try:
            return await call
        except RayActorError as e:
            log.warning("the job hub is unreachable: %s", e)
            raise ApiError(503, "the job store is restarting; retry shortly", type="server_error",
                           code="store_unavailable", headers={"Retry-After": "2"}) from None


class IngressBody:
    """The body of the `Ingress` deployment: checks that this node sees the shared output folder, then
    serves `build_app(IngressState(...))`; every response names the ingress replica that answered
    (`x-ditserve-replica`), for operators and tests."""

    def __init__(self, settings: ServerSettings, spec: RequestSpec, hub_name: str, token: str,
                 min_replicas: int = 1) -> None:
        import ray
        from ray import serve

        if settings.output_dir is not None:
            check_marker(Path(settings.output_dir), token, ray.get_runtime_context().get_node_id())
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        self._state = IngressState(settings, spec, hub_name, min_replicas)

    def __serve_build_asgi_app__(self) -> Any:
        from ditserve.server.app import build_app

        app = build_app(self._state)
        app.add_middleware(ReplicaHeader, replica=self._replica_id)
        return app


class ReplicaHeader:
    """Pure ASGI middleware: `x-ditserve-replica: <id>` on every response (the outermost layer, so 401s and 413s too)."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app = app
        self._header = (b"x-ditserve-replica", replica.encode("ascii", "replace"))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self._header]}
            await send(message)

        await self.app(scope, receive, named)
