"""Test-only fault injection: TRIBUTARY_CHAOS names one point where this process kills itself with SIGKILL.

- "actor:STAGE:SHARD:MARKER": a shard worker dies once, mid-shard (after its rows are written), the first time
  it computes SHARD of STAGE; it writes MARKER first, so the re-issued shard runs through.
- "driver:STAGE:N": the index driver dies right after its N-th commit in STAGE.

Unset (always, outside tests) every check is one environment lookup.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

VARIABLE = "TRIBUTARY_CHAOS"


def fault_point(site: str, stage: str, number: int) -> None:
    """Kill this process if TRIBUTARY_CHAOS names this point: `site` "actor" (number: the shard) or "driver"
    (number: how many shards this run has committed in `stage`)."""
    parts = os.environ.get(VARIABLE, "").split(":", 3)
    if site == "actor" and len(parts) == 4 and parts[:2] == ["actor", stage] and int(parts[2]) == number:
        marker = Path(parts[3])
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
    elif site == "driver" and len(parts) == 3 and parts[:2] == ["driver", stage] and int(parts[2]) == number:
        os.kill(os.getpid(), signal.SIGKILL)


def forwarded() -> dict[str, str]:
    """The setting, for the environment of Ray workers (which must see what the driver sees)."""
    return {VARIABLE: os.environ[VARIABLE]} if VARIABLE in os.environ else {}
