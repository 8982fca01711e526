"""`ditserve serve --ray`: start (or join) a Ray cluster, deploy the application, serve until SIGTERM/Ctrl-C.

Shutdown: the hub takes no new jobs, cancels the queued ones and stops the running ones at their
next step (within --shutdown-timeout), the application is deleted, the job database is closed
and the hub ended; a Ray cluster this command started is stopped with it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from ditserve.rayserve.application import build_application, start_hub
from ditserve.rayserve.options import HUB_NAMESPACE, RayOptions
from ditserve.rayserve.requirement import require_ray
from ditserve.server.settings import ServerSettings

__all__ = ["serve_on_ray", "stop_application"]

log = logging.getLogger("ditserve.rayserve")

SHUTDOWN_REASON = "cancelled: the server is shutting down"
SHUTDOWN_SLACK_S = 60.0  # beyond --shutdown-timeout, for deleting the application and stopping Ray
# Set for a local cluster (on a cluster, where `ray start` runs), unless the environment sets them: queue reports
# to Serve's autoscaler every second (Ray: 10 s), and Serve's control loop twice a second (Ray: ten times), which
# halves the controller's and GCS's idle CPU; jobs last seconds, so a half-second reaction costs nothing.
LOCAL_RAY_ENV = {"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
                 "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
                 "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}


def serve_on_ray(model: str, settings: ServerSettings, options: RayOptions, *, host: str = "127.0.0.1",
                 port: int = 30000, load: dict[str, Any] | None = None, log_level: str = "info",
                 warm: bool = True) -> int:
    """Serve `model` with `options`' replicas at http://host:port; the exit status (0 after a requested
    shutdown, 1 if the application could not be deployed)."""
    ray, serve = require_ray()
    from ditserve.pipelines import read_request_spec
    from ditserve.server.app import served_spec

    spec = served_spec(read_request_spec(model), settings)  # a wrong folder fails now, before Ray starts
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    own_dir = settings.output_dir is None
    if own_dir:
        settings = replace(settings, output_dir=Path(tempfile.mkdtemp(prefix="ditserve-outputs-")))
    Path(settings.output_dir).mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
    local = options.address is None
    if local:  # the raylet and every worker inherit these; on a cluster, set them where `ray start` runs
        for name, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(name, value)
    ray.init(address=options.address, namespace=HUB_NAMESPACE, include_dashboard=False,
             num_cpus=max(os.cpu_count() or 1, int(options.max_replicas * options.cpus + 0.999)) if local else None,
             logging_level=log_level.upper())
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    hub = None
    try:
        serve.start(http_options={"host": host, "port": port, "keep_alive_timeout_s": settings.keep_alive_timeout_s})
        hub, token = start_hub(settings, options, log_level)
        app = build_application(model, settings, options, spec, token, load=load or {}, warm=warm,
                                log_level=log_level)
        serve.run(app, name=options.app_name, route_prefix="/")
        log.info("serving %s on http://%s:%d: %s generator replica(s)%s, jobs and files in %s", settings.model_name,
                 host, port, options.initial_replicas,
                 f" (autoscaling {options.min_replicas}-{options.max_replicas})" if options.autoscaling else "",
                 settings.output_dir)
        stop.wait()
        return 0
    except Exception:  # a replica that cannot load its model or see the folder: the deployment failed
        log.exception("serving on Ray failed")
        return 1
    finally:
        log.info("shutting down")
        watchdog = threading.Timer(settings.shutdown_timeout_s + SHUTDOWN_SLACK_S, _give_up)
        watchdog.daemon = True
        watchdog.start()
        stop_application(options.app_name, hub, settings.shutdown_timeout_s)
        if local:
            serve.shutdown()
            ray.shutdown()
        if own_dir:
            shutil.rmtree(settings.output_dir, ignore_errors=True)  # type: ignore[arg-type]


def _give_up() -> None:
    """Shutdown hangs (the Ray cluster went away under it): leave rather than wait forever."""
    log.error("shutdown did not finish within --shutdown-timeout + %g s; exiting", SHUTDOWN_SLACK_S)
    os._exit(1)


def stop_application(app_name: str, hub: Any, timeout_s: float) -> None:
    """Stop taking jobs, stop the running ones (within `timeout_s`), delete the application, end the hub."""
    ray, serve = require_ray()
    if hub is not None:
        try:
            left = ray.get(hub.close.remote(SHUTDOWN_REASON, timeout_s), timeout=timeout_s + 10)
            if left:
                log.warning("%d job(s) did not stop within --shutdown-timeout %g s", left, timeout_s)
        except Exception:
            log.warning("the job hub did not close cleanly", exc_info=True)
    try:
        serve.delete(app_name)
    except Exception:
        log.warning("deleting the Serve application failed", exc_info=True)
    if hub is not None:
        try:
            ray.get(hub.shutdown.remote(), timeout=30)
        except Exception:
            log.warning("closing the job store failed", exc_info=True)
        ray.kill(hub)
