"""Connect to (or start) a Ray cluster and size the actor pool from its resources."""

from __future__ import annotations

import contextlib
import logging
import os

from engine.config import ClusterConfig
from engine.errors import TributaryError
from engine.testing import faults

log = logging.getLogger(__name__)


class _LocalTokenNotice(logging.Filter):
    """Ray announces on every start that token authentication is on: for the one-machine cluster Tributary
    starts itself (loopback only, token generated for it) that is the expected state, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


def _quiet_local_token_notice() -> None:
    notices = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _LocalTokenNotice) for f in notices.filters):
        notices.addFilter(_LocalTokenNotice())


def connect(cluster: ClusterConfig) -> None:
    import ray

    from engine.distributed.local_node import LOOPBACK, check_loopback, init_arguments, loopback_node

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    arguments: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
    starting = contextlib.nullcontext()
    if cluster.address == "local":
        # A cluster of one machine listens on loopback unless told otherwise (engine/distributed/local_node.py).
        node_ip = cluster.node_ip_address or LOOPBACK
        arguments.update(_node_ip_address=node_ip, include_dashboard=cluster.dashboard, num_cpus=cluster.local_cpus)
        arguments.update(init_arguments())
        starting = loopback_node()
        _quiet_local_token_notice()
    else:
        arguments["address"] = cluster.address
        if cluster.node_ip_address:
            arguments["_node_ip_address"] = cluster.node_ip_address
    try:
        with starting:
            ray.init(**arguments)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise TributaryError(
            f"cluster.address {cluster.address!r}: could not connect to Ray ({error}); start the cluster "
            "first (see launch/) or use address: local"
        ) from None
    if cluster.address == "local" and cluster.node_ip_address is None:
        check_loopback()


def forwarded_environment() -> dict[str, str]:
    """Non-secret settings workers must see as the driver does.

    Credentials are deliberately not forwarded (runtime environments are visible in Ray's state API):
    workers read them from their own node's environment, as the Ray processes there were started.
    """
    names = (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "TOKENIZERS_PARALLELISM",
        "HF_HUB_DISABLE_PROGRESS_BARS",
    )
    return {name: os.environ[name] for name in names if name in os.environ} | faults.forwarded()


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
