"""Run a module as `python -m MODULE ARGS` would, and write this process's peak RSS to a file when it exits.

The peak is VmHWM from /proc/self/status, not ru_maxrss: Linux carries ru_maxrss over from the parent across
fork and exec, so a child started by a benchmark that has grown (a model loaded, a query run) reports at least
the benchmark's own size, whatever the child itself used.

Usage: python -m benchmarks.peak_memory OUT_FILE MODULE [ARGS...]
"""

from __future__ import annotations

import atexit
import runpy
import sys
from pathlib import Path


def high_water_bytes() -> int:
    """This process's peak RSS since it was exec'd (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (peak memory is measured on Linux only)")


def main() -> None:
    out, module, *arguments = sys.argv[1:]
    atexit.register(lambda: Path(out).write_text(str(high_water_bytes())))
    sys.argv = [module, *arguments]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
