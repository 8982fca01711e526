"""The Ray Serve application: an `Ingress` deployment (HTTP, stateless) and a `Generator` deployment
(one pipeline and batching engine per replica), with the job hub actor they share.

Serve's own mechanisms do the distributing: each job is a call on the Generator deployment's
handle, so its router places jobs by replicas' queue lengths (`max_ongoing_requests` = --max-queue
per replica), and `autoscaling_config` scales replicas between --min-replicas and --max-replicas on
the jobs in flight per replica (queued at the router or in a batch; `target_ongoing_requests` =
--target-jobs-per-replica). `build_application` is what `ditserve serve --ray` deploys;
`ditserve.cli:ray_app` builds the same for `serve run ditserve.cli:ray_app cli="..."`.
"""

from __future__ import annotations

import secrets
from typing import Any

from ditserve.engine import RequestSpec
from ditserve.rayserve.hub import GENERATOR, JobHub
from ditserve.rayserve.ingress import IngressBody
from ditserve.rayserve.options import HUB_NAMESPACE, RayOptions
from ditserve.rayserve.replica import GeneratorReplica
from ditserve.rayserve.requirement import require_ray
from ditserve.server.settings import ServerSettings

__all__ = ["INGRESS", "build_application", "start_hub"]

INGRESS = "Ingress"
CONSTRUCTOR_RETRIES = 3  # a replica that cannot load its model fails the deployment after this many tries
HEALTH_CHECK_S = 5.0
HEAD_NODE = "node:__internal_head__"  # a resource only Ray's head node has


def start_hub(settings: ServerSettings, options: RayOptions, log_level: str = "info") -> tuple[Any, str]:
    """The application's job hub (`options.hub_name`): created on the head node (the cluster's one stable node,
    where the job database lives), detached so that it outlives a `serve run` driver; an existing one is reused.
    Returns the hub and the token its output-folder marker holds."""
    ray, _ = require_ray()
    if settings.output_dir is None:
        raise ValueError("serving on Ray needs --output-dir (a folder every node sees)")
    token = secrets.token_hex(8)
    hub = ray.remote(JobHub).options(
        name=options.hub_name, namespace=HUB_NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_restarts=-1, max_concurrency=10_000, resources={HEAD_NODE: 0.001},
    ).remote(str(settings.output_dir), settings.keep_jobs, settings.max_queue * options.max_replicas,
             options.max_attempts, options.app_name, token, log_level=log_level)
    return hub, ray.get(hub.token.remote())


def build_application(model: str, settings: ServerSettings, options: RayOptions, spec: RequestSpec, token: str, *,
                      load: dict[str, Any], warm: bool = True, log_level: str = "info") -> Any:
    """The bound Serve application. `spec`: the model's request spec under the server's limits; `load`: the
    replicas' `Pipeline.from_pretrained` options; `token`: the hub's output-folder marker; `log_level`: the
    replicas' (a line per request, Serve's access log, only at debug, as `ditserve serve` logs)."""
    _, serve = require_ray()
    logging_config = {"log_level": log_level.upper(), "enable_access_log": log_level == "debug"}
    scaling: dict[str, Any]
    if options.autoscaling:
        scaling = {"autoscaling_config": {
            "min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
            "initial_replicas": options.initial_replicas, "target_ongoing_requests": options.target_jobs,
            "upscale_delay_s": options.upscale_delay_s, "downscale_delay_s": options.downscale_delay_s,
            "look_back_period_s": options.look_back_s}}
    else:
        scaling = {"num_replicas": options.initial_replicas}
    generator = serve.deployment(GeneratorReplica, name=GENERATOR).options(
        ray_actor_options={"num_cpus": options.cpus, "num_gpus": options.gpus},
        max_ongoing_requests=settings.max_queue, graceful_shutdown_timeout_s=options.drain_timeout_s,
        health_check_period_s=HEALTH_CHECK_S, max_constructor_retry_count=CONSTRUCTOR_RETRIES,
        logging_config=logging_config, **scaling)
    ingress = serve.deployment(serve.ingress()(_Ingress), name=INGRESS).options(
        num_replicas=options.ingress_replicas, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=settings.max_queue * options.max_replicas + 1024,
        max_constructor_retry_count=CONSTRUCTOR_RETRIES, logging_config=logging_config)
    generators = generator.bind(model, load, settings, options.hub_name, token, options.torch_threads, warm,
                                log_level, options.ranks)
    return ingress.bind(settings, spec, options.hub_name, token, options.min_replicas, generators)


class _Ingress(IngressBody):
    """The ingress deployment's class: `IngressBody`, also taking the Generator deployment so that Serve
    deploys it as part of this application (jobs reach it through the hub, not through the ingress)."""

    def __init__(self, settings: ServerSettings, spec: RequestSpec, hub_name: str, token: str, min_replicas: int,
                 generators: Any) -> None:
        super().__init__(settings, spec, hub_name, token, min_replicas)
