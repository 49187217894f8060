"""The nodes a run needs: with cluster.min_nodes, a run that has fewer alive Ray nodes waits a bounded time
(cluster.node_wait_s) for a replacement to join, then stops with one line; what it committed stays, so the
same command run again resumes (an index from its finished shards)."""

from __future__ import annotations

import logging
import time

from engine.config import ClusterConfig
from engine.errors import TributaryError

log = logging.getLogger(__name__)
NODE_POLL_S = 1.0  # how often the alive count is read while waiting: a replacement is noticed within a second


def alive_nodes() -> int:
    """Alive Ray nodes of the connected cluster, the head included (as the GCS sees them)."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def require_nodes(cluster: ClusterConfig, doing: str) -> bool:
    """Return once at least cluster.min_nodes nodes are alive (at once without min_nodes), and whether that took
    waiting; after waiting cluster.node_wait_s for them, a TributaryError naming the count and how to resume."""
    wanted = cluster.min_nodes
    if wanted is None:
        return False
    alive = alive_nodes()
    if alive >= wanted:
        return False
    log.warning(
        "%s: %d node(s) alive, cluster.min_nodes is %d; waiting up to %g s for a node to join",
        doing,
        alive,
        wanted,
        cluster.node_wait_s,
    )
    deadline = time.monotonic() + cluster.node_wait_s
    while alive < wanted:
        if time.monotonic() >= deadline:
            raise TributaryError(
                f"{doing}: {alive} Ray node(s) alive but cluster.min_nodes is {wanted}, and none joined within "
                f"cluster.node_wait_s ({cluster.node_wait_s:g} s); finished shards are kept: start a node and "
                "run the same command again to resume"
            )
        time.sleep(NODE_POLL_S)
        alive = alive_nodes()
    log.warning("%s: %d node(s) alive again; going on", doing, alive)
    return True
