"""A TCP port for a service a test starts."""

from __future__ import annotations

import random
import socket

# Below the kernel's ephemeral range (32768-60999 here) and above Ray's worker ports (10002-19999): a port the
# kernel handed out by bind(0) may be taken by one of Ray's own processes before our service binds it, and a
# test then talks HTTP to a gRPC server.
_FIRST, _LAST = 20000, 32000


def unused_port() -> int:
    """A loopback port in a range neither the kernel's bind(0) nor Ray's workers draw from, free right now."""
    for candidate in random.sample(range(_FIRST, _LAST), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return candidate
    raise RuntimeError(f"no free loopback port in {_FIRST}-{_LAST}")
