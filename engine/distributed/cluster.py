"""Connect to (or start) a Ray cluster and size the actor pool from its resources."""

from __future__ import annotations

import logging
import os
import sys

from engine.config import ClusterConfig
from engine.errors import TributaryError

log = logging.getLogger(__name__)


def connect(cluster: ClusterConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    arguments: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
    node_ip = cluster.node_ip_address
    if cluster.address == "local":
        # A cluster of one machine listens on loopback unless told otherwise (Linux: all of 127/8 is loopback,
        # and Ray replaces 127.0.0.1 itself by the machine's routable address).
        node_ip = node_ip or ("127.0.0.2" if sys.platform.startswith("linux") else None)
        arguments.update(include_dashboard=False, num_cpus=cluster.local_cpus)
    else:
        arguments["address"] = cluster.address
    if node_ip:
        arguments["_node_ip_address"] = node_ip
    try:
        ray.init(**arguments)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise TributaryError(
            f"cluster.address {cluster.address!r}: could not connect to Ray ({error}); start the cluster "
            "first (see launch/) or use address: local"
        ) from None


def forwarded_environment() -> dict[str, str]:
    """Non-secret settings workers must see as the driver does.

    Credentials are deliberately not forwarded (runtime environments are visible in Ray's state API):
    workers read them from their own node's environment, as the Ray processes there were started.
    """
    names = (
        "TRIBUTARY_CHAOS",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "TOKENIZERS_PARALLELISM",
        "HF_HUB_DISABLE_PROGRESS_BARS",
    )
    return {name: os.environ[name] for name in names if name in os.environ}


def pool_size(cluster: ClusterConfig) -> int:
    """One actor per GPU; on CPU-only clusters, the CPUs divided by cpus_per_worker (or cluster.workers)."""
    import ray

    if cluster.workers is not None:
        return cluster.workers
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus and cluster.gpus_per_worker > 0:
        return max(1, int(gpus // cluster.gpus_per_worker))
    return max(1, int(resources.get("CPU", 1) // cluster.cpus_per_worker))
