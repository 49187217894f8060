"""What the store costs: pass-1 time with the Zarr writes (rows, metadata, partial sums) against the
same computation without writing, side by side in one run, for float32 and bfloat16 stores.

Usage: python -m benchmarks.store_cost [--rows 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    first_line,
    gpt2_like,
    non_negative_int,
    positive_int,
    random_corpus,
    side_by_side,
    write_jsonl,
    write_result,
)
from engine.config import parse_config
from engine.curvature.packing import covariance_width
from engine.gradients.passes import gradient_pass
from engine.indexing.worker import ShardWorker
from engine.local_or_ray import run_index

SEQUENCE = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--rows", type=positive_int, default=64)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--dim", type=non_negative_int, default=64)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    work = Path(tempfile.mkdtemp(prefix="tributary-store-cost-"))
    try:
        texts = random_corpus(args.rows, SEQUENCE, vocabulary=4000)
        model = gpt2_like(work / "model", texts, hidden=256, layers=4, heads=4, positions=SEQUENCE)
        train = write_jsonl(work / "train.jsonl", texts)
        workers = {}
        for dtype in ("float32", "bfloat16"):
            raw = {
                "model": {"path": str(model)},
                "data": {"train": str(train), "max_length": SEQUENCE, "batch_size": 8},
                "projection": {"dim": args.dim},
                "curvature": {"strategy": "ekfac"},
                "store": {"path": str(work / f"store-{dtype}.zarr"), "rows_per_chunk": 8, "dtype": dtype},
            }
            config = parse_config(raw)
            run_index(config, show_progress=False)  # lays out the store; the timed passes rewrite it
            worker = ShardWorker(config)
            worker._open().create_partials("covariance", covariance_width(worker.context.spec), 2)
            workers[dtype] = worker
        shards = range(len(workers["float32"]._open().shards()))

        def with_writes(dtype: str) -> float:
            started = time.perf_counter()
            for shard in shards:
                workers[dtype].gradients(shard)
            return time.perf_counter() - started

        def without_writes() -> float:
            worker = workers["float32"]
            started = time.perf_counter()
            for start, stop in worker._open().shards():
                gradient_pass(worker.context, worker._tokenized(start, stop), start)
            return time.perf_counter() - started

        variants = {
            "pass 1, no store": without_writes,
            "pass 1 + float32 store": lambda: with_writes("float32"),
            "pass 1 + bfloat16 store": lambda: with_writes("bfloat16"),
        }
        times = side_by_side(variants, args.rounds)
        base = statistics.median(times["pass 1, no store"])
        table = {
            name: {
                "seconds_median": round(statistics.median(s), 4),
                "overhead_vs_no_store": round(statistics.median(s) / base - 1, 4),
                "samples": [round(x, 4) for x in s],
            }
            for name, s in times.items()
        }
        width = workers["float32"].context.spec.total_width
        print(f"{args.rows} rows x {SEQUENCE} tokens, dim {args.dim} ({width} floats per row)")
        for name, row in table.items():
            print(f"{name:<26} {row['seconds_median']:.3f}s  overhead {100 * row['overhead_vs_no_store']:+.1f}%")
        path = write_result("store_cost", {"rows": args.rows, "dim": args.dim, "width": width, "results": table})
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
