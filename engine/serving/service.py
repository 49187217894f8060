"""Starting and stopping the service: connect to Ray, start Serve's HTTP proxy on serve.host:serve.port,
deploy the attribution replicas (and, with a `cluster` section, one row-range scorer per range)."""

from __future__ import annotations

import logging
import signal
import threading

from engine.config import ClusterConfig, JobConfig, parse_config
from engine.errors import TributaryError
from engine.serving.auth import read_token
from engine.store.location import redact

log = logging.getLogger(__name__)
APP_NAME = "tributary"


def with_serve_options(config: JobConfig, source: str, **options) -> JobConfig:
    """The config with the serve settings given on the command line (None: keep the config's)."""
    changes = {key: value for key, value in options.items() if value is not None}
    if not changes:
        return config
    raw = config.model_dump()
    raw["serve"] = dict(raw["serve"], **changes)
    return parse_config(raw, source=source)


def _range_scorers(config: JobConfig) -> list:
    from engine.distributed.cluster import pool_size
    from engine.distributed.scoring import row_ranges
    from engine.query.attributor import final_model, open_complete_store
    from engine.serving.app import range_scorer_deployment

    cluster = config.cluster
    _, store = final_model(config, open_complete_store(config.store.path))  # a training run: its final model's
    deployment = range_scorer_deployment()
    return [
        deployment.options(
            name=f"rows-{a}-{b}", num_replicas=1, ray_actor_options={"num_cpus": cluster.cpus_per_worker, "num_gpus": 0}
        ).bind(store.path, a, b, cluster.cpus_per_worker)
        for a, b in row_ranges(len(store.shards()), pool_size(cluster))
    ]


def build_application(config: JobConfig):
    from engine.distributed.cluster import forwarded_environment
    from engine.serving.app import AttributionService

    serve = config.serve
    scorers = _range_scorers(config) if config.cluster is not None else None
    return AttributionService.options(
        num_replicas=serve.replicas,
        max_ongoing_requests=serve.max_ongoing_requests,
        max_constructor_retry_count=1,  # a replica that cannot load (bad config, wrong store) fails again
        ray_actor_options={
            "num_cpus": serve.replica_cpus,
            "num_gpus": serve.replica_gpus,
            "runtime_env": {"env_vars": forwarded_environment()},
        },
    ).bind(config, scorers)


def start_service(config: JobConfig, name: str = APP_NAME, route_prefix: str = "/") -> str:
    """Deploy the service and return its URL once every replica has loaded the store and model.

    Several services (e.g. one per store) can share a cluster's HTTP proxy under different names and route
    prefixes; the proxy's host and port are those of the first one started.
    """
    from ray import serve

    from engine.distributed.cluster import connect
    from engine.query.attributor import open_complete_store

    open_complete_store(config.store.path)  # fail here, with the store's own message, not in a replica
    read_token(config.serve)  # likewise for a configured token that is missing (its value is not kept)
    connect(config.cluster or ClusterConfig())
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port})
    try:
        serve.run(build_application(config), name=name, route_prefix=route_prefix)
    except (RuntimeError, TributaryError) as error:
        reason = _failure_reason(name) or str(error)
        stop_service(name)
        raise TributaryError(f"the service did not start: {reason}") from None
    url = f"http://{config.serve.host}:{config.serve.port}{route_prefix.rstrip('/')}"
    log.debug("serving %s on %s (%d replica(s))", redact(config.store.path), url, config.serve.replicas)
    return url


def _failure_reason(name: str) -> str | None:
    """The error a replica raised while starting (a TributaryError names the input), from Serve's status."""
    from ray import serve

    try:
        deployments = serve.status().applications[name].deployments.values()
    except (KeyError, RuntimeError):
        return None
    lines = [line.strip() for deployment in deployments for line in (deployment.message or "").splitlines()]
    named = [line.split("TributaryError:", 1)[1].strip() for line in lines if "TributaryError:" in line]
    return named[-1] if named else None


def stop_service(name: str = APP_NAME) -> None:
    """Delete this service's application; shut Serve down only when no other application is left on it."""
    from ray import serve

    serve.delete(name)
    if not serve.status().applications:
        serve.shutdown()


def serve_until_stopped(config: JobConfig, on_ready=None) -> None:
    """Run the service until Ctrl-C or SIGTERM, then shut Serve down (only once it was started here)."""
    url = start_service(config)
    stopped = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        if on_ready is not None:
            on_ready(url)
        while not stopped.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_service()
