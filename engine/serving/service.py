"""Starting and stopping the service: connect to Ray, start Serve's HTTP proxy on serve.host:serve.port,
deploy the attribution replicas (and, with a `cluster` section, one row-range scorer per range)."""

from __future__ import annotations

import logging
import signal
import time
from typing import TYPE_CHECKING

from engine.config import ClusterConfig, JobConfig
from engine.errors import TributaryError
from engine.store.location import redact

if TYPE_CHECKING:
    from engine.serving.plan import ServePlan

log = logging.getLogger(__name__)
APP_NAME = "tributary"


def with_serve_options(config: JobConfig, source: str, **options) -> JobConfig:
    """The config with the serve settings given on the command line (None: keep the config's)."""
    changes = {key: value for key, value in options.items() if value is not None}
    if not changes:
        return config
    return config.derive(serve=changes, source=source)


def _range_scorers(plan: ServePlan) -> list:
    from engine.distributed.cluster import pool_size
    from engine.query.row_range import row_ranges
    from engine.serving.app import range_scorer_deployment

    cluster = plan.config.cluster
    if cluster is None:
        raise ValueError("range scorers are only built for a config with a cluster section")
    deployment = range_scorer_deployment()
    return [  # a training run: its final model's store
        deployment.options(
            name=f"rows-{a}-{b}", num_replicas=1, ray_actor_options={"num_cpus": cluster.cpus_per_worker, "num_gpus": 0}
        ).bind(plan.final_store, a, b, cluster.cpus_per_worker)
        for a, b in row_ranges(plan.shards, pool_size(cluster))
    ]


def build_application(plan: ServePlan):
    from engine.distributed.cluster import forwarded_environment
    from engine.serving.app import AttributionService

    config = plan.config
    serve = config.serve
    scorers = _range_scorers(plan) if config.cluster is not None else None
    return AttributionService.options(
        num_replicas=serve.replicas,
        max_ongoing_requests=serve.max_ongoing_requests,
        max_constructor_retry_count=1,  # a replica that cannot load (bad config, wrong store) fails again
        ray_actor_options={
            "num_cpus": serve.replica_cpus,
            "num_gpus": replica_gpus(config),
            "runtime_env": {"env_vars": forwarded_environment()},
        },
    ).bind(plan, scorers)


def start_service(config: JobConfig, name: str = APP_NAME, route_prefix: str = "/") -> str:
    """Deploy the service and return its URL once every replica has loaded the store and model.

    Several services (e.g. one per store) can share a cluster's HTTP proxy under different names and route
    prefixes; the proxy's host and port are those of the first one started.
    """
    from engine.distributed.cluster import connect
    from engine.serving.plan import resolve_serve_plan

    plan = resolve_serve_plan(config)
    connect(config.cluster or ClusterConfig())
    return deploy(plan, name, route_prefix)


def replica_gpus(config: JobConfig) -> float:
    """GPUs a service replica reserves: serve.replica_gpus, and with GPUs asked for, all the devices a
    device_map replica spreads its layers over."""
    gpus = config.serve.replica_gpus
    if gpus > 0 and config.placement.kind == "device_map":
        return max(gpus, config.placement.devices_per_replica)
    return gpus


def deploy(plan: ServePlan, name: str = APP_NAME, route_prefix: str = "/") -> str:
    """Start Serve's HTTP proxy and the application of `plan` on the connected Ray; the service's URL."""
    from ray import serve

    from engine.serving.proxy_guard import CALLBACK, CALLBACK_VARIABLE

    config = plan.config
    serve.start(  # the proxies inherit the controller's environment: a died replica's requests get 503s
        http_options={"host": config.serve.host, "port": config.serve.port},
        controller_options={"runtime_env": {"env_vars": {CALLBACK_VARIABLE: CALLBACK}}},
    )
    try:
        serve.run(build_application(plan), name=name, route_prefix=route_prefix)
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


class _StopRequested(Exception):
    """SIGTERM: raised in the main thread, so it also interrupts a service that is still starting."""


def _request_stop(*_) -> None:
    raise _StopRequested


def serve_until_stopped(config: JobConfig, on_ready=None) -> None:
    """Run the service until Ctrl-C or SIGTERM, then stop it and return (the command exits 0).

    A Ray this process started (`cluster.address: local`, the default) is stopped whole, Serve with it,
    without asking Serve to delete the application first: a signal sent to the whole process group (what
    `timeout`, systemd and Ctrl-C do) has already stopped the GCS and the raylet, and a Serve call would
    wait a minute for them (engine/distributed/local_node.py). On a cluster started elsewhere only this
    service's application is deleted.
    """
    import ray

    from engine.distributed.cluster import connect
    from engine.distributed.local_node import adopt_orphans, stop_local_node
    from engine.serving.plan import resolve_serve_plan

    plan = resolve_serve_plan(config)
    cluster = config.cluster or ClusterConfig()
    owns_ray = not ray.is_initialized() and cluster.address == "local"
    if owns_ray:
        adopt_orphans()
    connect(cluster)
    previous = signal.signal(signal.SIGTERM, _request_stop)  # after ray.init, which installs a handler of its own
    try:
        url = deploy(plan)
        if on_ready is not None:
            on_ready(url)
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, _StopRequested):
        log.info("stopping the service")
    finally:
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C or SIGTERM: keep stopping
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if owns_ray:
                stop_local_node()
            elif ray.is_initialized():
                stop_service()
        finally:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, interrupt)
