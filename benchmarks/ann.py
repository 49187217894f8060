"""Approximate top-k against the exact scan: recall@10 after rerank, query latency at Q = 1 and Q = 32, index build
time and size, on a synthetic store of low-rank rows plus noise (so that neighbours are meaningful).

The store is written chunk by chunk and every pass over it streams it, so no step holds it whole (the issue's
size, 1M rows x 4096 float32, is 16 GiB). Ground truth is the exact scan Tributary runs (`rank_store`).

Usage: python -m benchmarks.ann [--rows 1000000] [--dim 4096] [--rank 64] [--rerank 100] [--no-row-copy]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import bare_store_manifest, first_line, non_negative_int, positive_int, write_result
from engine.ann.build import build_index
from engine.ann.index import AnnIndex
from engine.ann.layout import index_location
from engine.query.approximate import rank_approximate
from engine.query.scoring import rank_store
from engine.store import GradientStore
from engine.store.zarr_store import default_rows_per_chunk

K = 10


class LowRankRows:
    """Rows x = (z ⊙ s) W + σ ε: z ~ N(0, I_r), a decaying spectrum s, a fixed random W (r x D), noise ε;
    drawn block by block, the same rows for the same seed whatever the block size."""

    def __init__(self, dim: int, rank: int, noise: float, seed: int = 0):
        self.basis = np.random.default_rng(seed).standard_normal((rank, dim), dtype=np.float32) / np.sqrt(rank)
        self.spectrum = (1.0 / np.sqrt(np.arange(1, rank + 1))).astype(np.float32)
        self.noise = noise * np.sqrt(float(np.sum(self.spectrum**2)) / rank)  # relative to the structure's norm
        self.seed = seed

    def block(self, start: int, stop: int) -> np.ndarray:
        generator = np.random.default_rng([self.seed, start])
        coefficients = generator.standard_normal((stop - start, len(self.spectrum)), dtype=np.float32) * self.spectrum
        noise = generator.standard_normal((stop - start, self.basis.shape[1]), dtype=np.float32)
        return coefficients @ self.basis + self.noise * noise


def write_store(path: Path, rows: int, dim: int, rows_per_chunk: int, source: LowRankRows) -> GradientStore:
    manifest = bare_store_manifest(rows, dim, rows_per_chunk)
    store = GradientStore.create(str(path), manifest)
    batch = max(1, (64 << 20) // (dim * 4) // rows_per_chunk) * rows_per_chunk  # write ~64 MiB at a time
    for start in range(0, rows, batch):
        stop = min(rows, start + batch)
        store.write_rows(
            start,
            source.block(start, stop),
            [str(i) for i in range(start, stop)],
            np.ones(stop - start),
            np.zeros(stop - start),
        )
    store.update_manifest(complete=True, completed_shards=list(range(len(store.shards()))))
    return store


def timed(call, rounds: int) -> tuple[float, list[float]]:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples), [round(s, 4) for s in samples]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--rows", type=positive_int, default=1_000_000)
    parser.add_argument("--dim", type=positive_int, default=4096)
    parser.add_argument("--rank", type=positive_int, default=64, help="rank of the structure under the noise")
    parser.add_argument("--noise", type=float, default=0.5, help="noise norm relative to the structure")
    parser.add_argument(
        "--rows-per-chunk", type=positive_int, default=None, help="store chunking (default: ~16 MiB chunks)"
    )
    parser.add_argument("--no-row-copy", action="store_true", help="rerank from the store instead of the index's copy")
    parser.add_argument("--rerank", type=non_negative_int, default=100)
    parser.add_argument("--codec", default="SQ8")
    parser.add_argument("--lists", type=positive_int, default=None)
    parser.add_argument("--probes", type=positive_int, default=None)
    parser.add_argument("--rounds", type=positive_int, default=3, help="timed repetitions of each approximate query")
    parser.add_argument("--exact-rounds", type=positive_int, default=1, help="timed repetitions of each exact scan")
    parser.add_argument("--workdir", default=None, help="where the store goes (default: a temporary directory)")
    parser.add_argument("--name", default="ann", help="results file benchmarks/results/NAME.json")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tributary-ann-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        source = LowRankRows(args.dim, args.rank, args.noise)
        started = time.perf_counter()
        chunk = args.rows_per_chunk or default_rows_per_chunk(args.dim, "float32", args.rows)
        store = write_store(work / "store.zarr", args.rows, args.dim, chunk, source)
        print(f"store: {args.rows} x {args.dim} float32 written in {time.perf_counter() - started:.1f} s", flush=True)
        queries = LowRankRows(args.dim, args.rank, args.noise).block(10**12, 10**12 + 32).astype(np.float64)

        started = time.perf_counter()
        record = build_index(
            store.path, ("dot",), args.codec, args.lists, args.probes, False, row_copy=not args.no_row_copy
        )
        build_seconds = time.perf_counter() - started
        index_bytes = directory_bytes(index_location(store.path))
        index = AnnIndex(store.path, store)
        print(
            f"index: {record.plan.settings} built in {build_seconds:.1f} s, {index_bytes / 2**20:.1f} MiB", flush=True
        )

        truth = rank_store(store, queries, False, K, full=False)
        exact_seconds = {}
        for q in (1, 32):
            exact_seconds[q] = timed(
                lambda q=q: rank_store(store, queries[:q], False, K, full=False), args.exact_rounds
            )
            print(f"exact scan Q={q}: {exact_seconds[q][0]:.3f} s", flush=True)
        index.search(queries[:1], False, K)  # load the index file once, outside the timings
        results, approximate_seconds = {}, {}
        for rerank in sorted({0, args.rerank}):
            found = rank_approximate(index, store, queries, False, K, rerank)
            results[rerank] = {
                "recall_at_10": recall(found.top_indices, truth.top_indices),
                "bottom_recall_at_10": recall(found.bottom_indices, truth.bottom_indices),
            }
            for q in (1, 32):
                approximate_seconds[(rerank, q)] = timed(
                    lambda q=q, rerank=rerank: rank_approximate(index, store, queries[:q], False, K, rerank),
                    args.rounds,
                )
            print(
                f"rerank {rerank}: {results[rerank]}, latency Q=1 {approximate_seconds[(rerank, 1)][0]:.4f} s, "
                f"Q=32 {approximate_seconds[(rerank, 32)][0]:.4f} s",
                flush=True,
            )
        payload = {
            "rows": args.rows,
            "dim": args.dim,
            "rank": args.rank,
            "noise": args.noise,
            "rows_per_chunk": chunk,
            "row_copy": not args.no_row_copy,
            "store_bytes": args.rows * args.dim * 4,
            "index": {
                "settings": record.plan.settings.model_dump(),
                "build_seconds": round(build_seconds, 2),
                "phase_seconds": record.seconds,
                "bytes": index_bytes,
                "faiss": record.faiss_version,
            },
            "exact_scan_seconds": {
                f"Q={q}": {"median": round(m, 4), "samples": s} for q, (m, s) in exact_seconds.items()
            },
            "approximate": {
                f"rerank={rerank}": dict(
                    results[rerank],
                    **{
                        f"seconds_Q={q}": {
                            "median": round(approximate_seconds[(rerank, q)][0], 4),
                            "samples": approximate_seconds[(rerank, q)][1],
                        }
                        for q in (1, 32)
                    },
                )
                for rerank in results
            },
        }
        path = write_result(args.name, payload)
        print(f"wrote {path}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
