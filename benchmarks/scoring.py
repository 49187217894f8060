"""Scoring read throughput: streaming the store while scoring Q ∈ {1, 16, 128} queries, against a
plain sequential read of the same array (the roofline here), side by side in one run; and what the per-chunk
xxh3 digest costs: the read and the Q=1 scan of a copy of the store whose chunks carry none (as before store
format 4), each after a read of its own store, in the same rounds.

Usage: python -m benchmarks.scoring [--rows 40000] [--width 4096] [--rounds 3]
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
import zarr

from benchmarks.common import bare_store_manifest, first_line, positive_int, side_by_side, write_result
from engine.query.scoring import score_store
from engine.spectral.methods import Method
from engine.store import GradientStore
from engine.store.zarr_store import default_rows_per_chunk

GRAD_DOT = Method("grad_dot", needs_curvature=False, normalise=False, spectral=None)


def build_store(path: Path, rows: int, width: int) -> GradientStore:
    """Random rows under a manifest that records no model or data (nothing here reads them)."""
    manifest = bare_store_manifest(rows, width, default_rows_per_chunk(width, "float32", rows))
    store = GradientStore.create(str(path), manifest)
    generator = np.random.default_rng(0)
    for start, stop in store.shards():
        block = generator.standard_normal((stop - start, width), dtype=np.float32)
        store.write_rows(
            start, block, [str(i) for i in range(start, stop)], np.ones(stop - start), np.zeros(stop - start)
        )
    return store


def without_digests(source: Path, target: Path) -> GradientStore:
    """A copy of the store at `source` whose `grads` chunks carry no digest (as stores before format 4)."""
    shutil.copytree(source, target)
    group = zarr.open_group(str(target), mode="r+")
    old = group["grads"]
    assert isinstance(old, zarr.Array)
    rows = np.asarray(old[...])
    plain = group.create_array(
        "grads", shape=old.shape, chunks=old.chunks, dtype=old.dtype, fill_value=0, compressors=None, overwrite=True
    )
    plain.with_config({"write_empty_chunks": True})[...] = rows
    plain.attrs["logical_dtype"] = "float32"
    return GradientStore.open(str(target))


def sequential_read(store: GradientStore) -> float:
    started = time.perf_counter()
    for start, stop in store.shards():
        store.read_rows(start, stop)
    return time.perf_counter() - started


def scoring(store: GradientStore, queries: int, width: int) -> float:
    transformed = np.random.default_rng(queries).standard_normal((queries, width))
    started = time.perf_counter()
    score_store(store, transformed, GRAD_DOT)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--rows", type=positive_int, default=40000)
    parser.add_argument("--width", type=positive_int, default=4096)
    parser.add_argument("--rounds", type=positive_int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tributary-scoring-"))
    try:
        store = build_store(work / "store.zarr", args.rows, args.width)
        size = args.rows * args.width * 4
        plain = without_digests(work / "store.zarr", work / "plain.zarr")
        variants = {
            "sequential read": lambda: sequential_read(store),
            "score Q=1": lambda: scoring(store, 1, args.width),
            "sequential read, no digests": lambda: sequential_read(plain),
            "score Q=1, no digests": lambda: scoring(plain, 1, args.width),
        }
        for q in (16, 128):
            variants[f"score Q={q}"] = lambda q=q: scoring(store, q, args.width)
        times = side_by_side(variants, args.rounds)
        roofline = statistics.median(times["sequential read"])
        table = {}
        for name, samples in times.items():
            seconds = statistics.median(samples)
            table[name] = {
                "seconds_median": round(seconds, 4),
                "gib_per_s": round(size / seconds / 2**30, 3),
                "fraction_of_roofline": round(roofline / seconds, 3),
                "samples": [round(s, 4) for s in samples],
            }
        grads = store.group["grads"]
        assert isinstance(grads, zarr.Array)
        codecs = ", ".join(type(c).__name__ for c in grads.compressors) or "uncompressed"
        print(
            f"store: {args.rows} rows x {args.width} float32 = {size / 2**30:.2f} GiB, {codecs}, chunks of "
            f"{store.rows_per_chunk} rows"
        )
        for name, row in table.items():
            print(f"{name:<16} {row['gib_per_s']:>7} GiB/s  {row['fraction_of_roofline']:>6} of roofline")
        digest_cost = {
            task: round(table[task]["seconds_median"] / table[f"{task}, no digests"]["seconds_median"] - 1, 3)
            for task in ("sequential read", "score Q=1")
        }
        print(f"digest cost (median with / without - 1): {digest_cost}")
        path = write_result(
            "scoring",
            {
                "rows": args.rows,
                "width": args.width,
                "bytes": size,
                "results": table,
                "digest_cost": digest_cost,
                "load_average": [round(x, 2) for x in os.getloadavg()],
            },
        )
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
