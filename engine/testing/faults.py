"""Test-only fault injection: TRIBUTARY_CHAOS names one point where this process kills itself with SIGKILL.

- "actor:STAGE:SHARD:MARKER": a shard worker dies once, mid-shard (after its rows are written), the first time
  it computes SHARD of STAGE; it writes MARKER first, so the re-issued shard runs through.
- "driver:STAGE:N": the index driver dies right after its N-th commit in STAGE.
- "stall:STAGE:NODE:MARKER": a shard worker on Ray node NODE (its id) that reaches the fault point of STAGE
  writes the shard's number to MARKER and sleeps there, so a test can kill that node with a shard of STAGE
  certainly in flight on it (a lost node: tests/e2e/test_lost_node.py).

Unset (always, outside tests) every check is one environment lookup.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

VARIABLE = "TRIBUTARY_CHAOS"
STALL_S = 600  # longer than any test waits: the stalled worker ends when its node is killed


def fault_point(site: str, stage: str, number: int) -> None:
    """Kill this process if TRIBUTARY_CHAOS names this point: `site` "actor" (number: the shard) or "driver"
    (number: how many shards this run has committed in `stage`)."""
    parts = os.environ.get(VARIABLE, "").split(":", 3)
    if site == "actor" and len(parts) == 4 and parts[:2] == ["actor", stage] and int(parts[2]) == number:
        marker = Path(parts[3])
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
    elif site == "actor" and len(parts) == 4 and parts[:2] == ["stall", stage] and parts[2] == _ray_node():
        Path(parts[3]).write_text(str(number))
        time.sleep(STALL_S)
    elif site == "driver" and len(parts) == 3 and parts[:2] == ["driver", stage] and int(parts[2]) == number:
        os.kill(os.getpid(), signal.SIGKILL)


def _ray_node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def forwarded() -> dict[str, str]:
    """The setting, for the environment of Ray workers (which must see what the driver sees)."""
    return {VARIABLE: os.environ[VARIABLE]} if VARIABLE in os.environ else {}
