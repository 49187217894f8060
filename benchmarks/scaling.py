"""Index scaling on Ray: tokens/s with 1 and 2 workers (one torch thread each), side by side.

The full index (EK-FAC, true Fisher: pass 1 + eigendecomposition + pass 2) of a GPT-2-like model on
random text, on a local Ray cluster of this machine. Times are the passes over the data recorded in
the store's manifest (actor start-up and model loading excluded; they are reported separately).

Usage: python -m benchmarks.scaling [--rows 96] [--rounds 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import first_line, gpt2_like, positive_int, random_corpus, write_jsonl, write_result
from engine.config import parse_config
from engine.local_or_ray import run_index

SEQUENCE = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--rows", type=positive_int, default=96)
    parser.add_argument("--rounds", type=positive_int, default=2)
    parser.add_argument("--hidden", type=positive_int, default=256)
    parser.add_argument("--layers", type=positive_int, default=4)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(
        num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.2", logging_level=logging.ERROR
    )
    work = Path(tempfile.mkdtemp(prefix="tributary-scaling-"))
    try:
        texts = random_corpus(args.rows, SEQUENCE, vocabulary=4000)
        model = gpt2_like(work / "model", texts, hidden=args.hidden, layers=args.layers, heads=4, positions=SEQUENCE)
        train = write_jsonl(work / "train.jsonl", texts)
        tokens = args.rows * SEQUENCE

        def index(workers: int) -> dict:
            raw = {
                "model": {"path": str(model)},
                "data": {"train": str(train), "max_length": SEQUENCE, "batch_size": 8},
                "projection": {"dim": 16},
                "curvature": {"strategy": "ekfac"},
                "store": {"path": str(work / f"store-{workers}.zarr"), "rows_per_chunk": 8},
                "cluster": {"address": "local", "workers": workers, "cpus_per_worker": 1},
            }
            started = time.perf_counter()
            timings = run_index(parse_config(raw), overwrite=True, show_progress=False).manifest.timings or {}
            wall = time.perf_counter() - started
            return {"passes_s": timings["total_s"] - timings["setup_s"], "wall_s": wall}

        index(1)  # warm-up: Ray worker processes and imports
        samples: dict[int, list[dict]] = {1: [], 2: []}
        for _ in range(args.rounds):
            for workers in (1, 2):
                samples[workers].append(index(workers))
        table = {}
        for workers, runs in samples.items():
            passes = statistics.median(run["passes_s"] for run in runs)
            table[f"{workers}_workers"] = {
                "passes_s_median": round(passes, 3),
                "tokens_per_s": round(tokens / passes, 1),
                "wall_s_median": round(statistics.median(r["wall_s"] for r in runs), 3),
                "samples_passes_s": [round(r["passes_s"], 3) for r in runs],
            }
        speedup = table["1_workers"]["passes_s_median"] / table["2_workers"]["passes_s_median"]
        print(f"{args.rows} rows x {SEQUENCE} tokens, GPT-2-like {args.hidden}x{args.layers}, EK-FAC, dim 16")
        for name, row in table.items():
            print(
                f"{name:<10} tokens/s {row['tokens_per_s']:>9}  passes {row['passes_s_median']:.2f}s  wall {row['wall_s_median']:.2f}s"
            )
        print(f"speed-up 2 vs 1 workers: {speedup:.2f}x (goal >= 1.7x)")
        path = write_result(
            "scaling", {"rows": args.rows, "sequence": SEQUENCE, "results": table, "speedup_2_vs_1": round(speedup, 3)}
        )
        print(f"wrote {path}")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
