"""Many replicas behind one endpoint on Ray Serve (`ditserve serve --ray`).

Nothing here is imported by `import ditserve` or by `ditserve serve` without `--ray`; the modules
that need Ray import it themselves (`ditserve.rayserve.requirement.require_ray` says how to install it).

- `options`: the replica count, autoscaling and resources, checked before anything starts;
- `hub`: the one job store every replica shares (a named Ray actor owning the SQLite job
  database in the shared output folder) and the dispatcher that hands each job to a
  generator replica through a Serve deployment handle, re-queuing a job whose replica died;
- `replica`: a generator replica: one pipeline and its batching engine, on its own device;
- `ingress`: the HTTP front: the same FastAPI routes as `ditserve serve`, over the shared store;
- `application`: the Serve application (deployments and their configs), also for `serve run`;
- `launch`: `ditserve serve --ray`: start or join a cluster, deploy, wait for a signal, shut down.
"""
