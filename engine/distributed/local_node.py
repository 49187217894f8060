"""A Ray node started by this process (`cluster.address: local`): bound to loopback, and stopped whole.

Loopback. Ray 2.60 binds the GCS, the raylet, the workers' gRPC servers and the agents to loopback only
when the node's address is a loopback one; otherwise they listen on every interface. But `ray.init`
replaces a loopback `_node_ip_address` by the machine's routable address unless Ray clusters are disabled
(`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`, read once when Ray is imported). So the node is started with
127.0.0.1 and that switch turned off for the length of `ray.init` only: a later `address: auto` in the
same process still finds its own routable address. One listener ignores the node's address: each Serve
replica's inter-deployment gRPC server binds `[::]:0`; a worker setup hook makes Ray's gRPC helper bind
such all-interfaces addresses to the node's address instead.

Stopping. A signal sent to the whole process group (`timeout`, systemd, Ctrl-C) reaches the GCS, the
raylet and the workers too. Once the raylet is gone its workers belong to no one and linger, and
`ray.shutdown` waits for a GCS that is gone. This process therefore adopts the node's orphans (a child
subreaper, Linux) and, when it stops, ends every process below it before shutting Ray down.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
from collections.abc import Iterator

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"
_PR_SET_CHILD_SUBREAPER = 36
# The driver flushes task events to the GCS on shutdown for up to 5 s by default; after a group-wide
# signal the GCS is gone and every stop would take those 5 s.
_SHORT_FLUSH = {"RAY_task_events_shutdown_flush_timeout_ms": "500"}


def is_loopback(address: str) -> bool:
    import ipaddress

    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address == "localhost"
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


@contextlib.contextmanager
def loopback_node() -> Iterator[None]:
    """Around `ray.init(_node_ip_address=LOOPBACK)`: keep Ray from replacing the loopback address."""
    from ray._private import ray_constants

    for name, value in _SHORT_FLUSH.items():
        os.environ.setdefault(name, value)
    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous


def init_arguments() -> dict:
    """What `ray.init` needs, besides the loopback address, to keep a local node on loopback."""
    return {"runtime_env": {"worker_process_setup_hook": f"{__name__}.{bind_worker_servers_to_node.__name__}"}}


def bind_worker_servers_to_node() -> None:
    """In each worker of a loopback node: gRPC servers asked for all interfaces bind the node's address.

    A failing setup hook would stop every worker, so a Ray without this helper only gets a warning.
    """
    import ray

    try:
        from ray._common import tls_utils

        node = ray.util.get_node_ip_address()
        add_port = tls_utils.add_port_to_grpc_server
    except (ImportError, AttributeError) as error:
        log.warning("Serve replicas may listen on every interface: %s", error)
        return
    if not is_loopback(node):
        return

    def add_port_on_node(server, address: str):
        host, _, port = address.rpartition(":")
        if host in ("[::]", "0.0.0.0", ""):
            address = f"{node}:{port}"
        return add_port(server, address)

    tls_utils.add_port_to_grpc_server = add_port_on_node


def check_loopback() -> None:
    """Warn when a Ray version ignored the loopback address (its listeners would be on every interface)."""
    import ray

    address = ray.util.get_node_ip_address()
    if not is_loopback(address):
        log.warning("Ray's node took address %s, not loopback: its ports may be reachable from the network", address)


def adopt_orphans() -> None:
    """Make this process the parent of any descendant whose parent dies (Linux; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.debug("prctl(PR_SET_CHILD_SUBREAPER) failed: errno %d", ctypes.get_errno())


def stop_local_node(grace_s: float = 1.0) -> None:
    """End every process below this one (SIGTERM, then SIGKILL after grace_s), then shut Ray down.

    The GCS and the raylet drain for seconds on SIGTERM; a local node keeps nothing they would save.
    """
    import psutil  # a dependency of accelerate's and of Ray's
    import ray

    below = psutil.Process().children(recursive=True)
    for process in below:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(below, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    ray.shutdown()
