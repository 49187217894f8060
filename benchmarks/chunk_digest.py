"""What the per-chunk xxh3 digest costs a scan: the same rows stored with digests (as `tributary index` writes
them) and without, read and scored (grad_dot, Q=1) in alternating rounds in one process; wall-clock and
process CPU time, medians and minima. Each timed call follows an untimed one of the same task and store, and
which store goes first alternates from round to round: the first read after the other task is slower
whichever store it is (+20-100% on a loaded machine; allocator or cache state), which a fixed order charged
to the digest store alone (the +39% wall / +20% CPU this benchmark first reported for the scan).

Usage: python -m benchmarks.chunk_digest [--rows 16000] [--width 2048] [--rounds 21]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import first_line, positive_int, write_result
from benchmarks.scoring import GRAD_DOT, build_store, without_digests
from engine.query.scoring import score_store
from engine.store import GradientStore


def timed(call, store: GradientStore) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    call(store)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--rows", type=positive_int, default=16000)
    parser.add_argument("--width", type=positive_int, default=2048)
    parser.add_argument("--rounds", type=positive_int, default=21)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tributary-digest-"))
    try:
        stores = {"digest": build_store(work / "digest.zarr", args.rows, args.width)}
        stores["none"] = without_digests(work / "digest.zarr", work / "none.zarr")
        query = np.random.default_rng(1).standard_normal((1, args.width))
        tasks = {
            "read": lambda store: [store.read_rows(a, b) for a, b in store.shards()],
            "score Q=1": lambda store: score_store(store, query, GRAD_DOT),
        }
        samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for round_ in range(args.rounds):
            order = list(stores.items()) if round_ % 2 == 0 else list(reversed(stores.items()))
            for task, run in tasks.items():
                for name, store in order:
                    run(store)
                    samples.setdefault((task, name), []).append(timed(run, store))
        results: dict[str, dict[str, dict[str, float]]] = {}
        for task in tasks:
            costs = []
            for clock, index in (("wall", 0), ("cpu", 1)):
                for stat in (statistics.median, min):
                    digest, plain = (stat(s[index] for s in samples[(task, n)]) for n in ("digest", "none"))
                    percent = 100 * (digest - plain) / plain
                    results.setdefault(task, {})[f"{clock}_{stat.__name__[:3]}"] = {
                        "none_s": round(plain, 5),
                        "digest_s": round(digest, 5),
                        "cost_percent": round(percent, 1),
                    }
                    costs.append(f"{clock} {stat.__name__[:3]} {plain:.4f}s -> {digest:.4f}s ({percent:+.1f}%)")
            print(f"{task:<10} " + "; ".join(costs))
        payload = {"rows": args.rows, "width": args.width, "rounds": args.rounds, "results": results}
        print(write_result("chunk_digest", dict(payload, load_average=os.getloadavg())))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
