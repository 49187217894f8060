"""Serving throughput and latency: requests/s and p50/p99 at 1, 8 and 32 concurrent clients, with batching
(up to 64 queries per scoring pass) and without (batch size 1), side by side in one run.

Both services run at once on one Ray Serve proxy (two applications, /batched and /single), each one
replica holding the same model and store; the variants alternate round by round so drift in machine
speed hits both alike. Every request carries one query (prompt + completion) and asks for the top 10.
The load generator (one thread per client, each with its own keep-alive connection) runs on the same
machine as the service.

The store: 600 rows of 24 words, projection dim 64 (32,768 floats per row, 75 MiB float32), K-FAC factors,
method `if`; a pass over it costs far more than a query's own gradient, as with any real store.

Usage: python -m benchmarks.serving [--rows 600] [--dim 64] [--rounds 3] [--requests 96]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import (
    first_line,
    gpt2_like,
    non_negative_int,
    positive_int,
    random_corpus,
    write_jsonl,
    write_result,
)
from engine.config import parse_config
from engine.local_or_ray import run_index
from engine.store.zarr_store import GradientStore

CONCURRENCY = (1, 8, 32)
VARIANTS = {
    "batched": {"batch_max_queries": 64, "max_queries_per_request": 32},
    "single": {"batch_max_queries": 1, "max_queries_per_request": 1},
}
WORDS_PER_ROW = 24


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def run_load(url: str, clients: int, total: int, queries: list[dict]) -> tuple[float, list[float]]:
    """(wall seconds, per-request latencies) of `clients` threads sending `total` requests between them."""
    from engine.serving.client import AttributionClient

    per_client = math.ceil(total / clients)
    start = threading.Barrier(clients)

    def client(number: int) -> list[float]:
        latencies = []
        rng = random.Random(number)
        with AttributionClient(url, timeout=300) as own:
            own.health()  # connect before the clock starts
            start.wait()
            for _ in range(per_client):
                began = time.perf_counter()
                own.attribute([rng.choice(queries)], top_k=10)
                latencies.append(time.perf_counter() - began)
        return latencies

    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    return time.perf_counter() - began, [latency for result in results for latency in result]


def main() -> None:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--rows", type=positive_int, default=600)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--requests", type=positive_int, default=96, help="requests per measurement")
    parser.add_argument("--dim", type=non_negative_int, default=64)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    load_at_start = os.getloadavg()  # other work on the machine shows here
    import ray

    from engine.serving.client import AttributionClient
    from engine.serving.service import start_service

    work = Path(tempfile.mkdtemp(prefix="tributary-serving-"))
    try:
        texts = random_corpus(args.rows, WORDS_PER_ROW, vocabulary=500)
        model = gpt2_like(work / "model", texts, hidden=64, layers=2, heads=2, positions=WORDS_PER_ROW + 8)
        train = write_jsonl(work / "train.jsonl", texts)
        raw = {
            "model": {"path": str(model)},
            "data": {"train": str(train), "max_length": WORDS_PER_ROW + 8, "batch_size": 32},
            "projection": {"dim": args.dim},
            "curvature": {"strategy": "kfac"},
            "method": {"name": "if"},
            "store": {"path": str(work / "store.zarr")},
        }
        started = time.perf_counter()
        store = run_index(parse_config(raw), show_progress=False)
        if not isinstance(store, GradientStore):
            raise TypeError(f"the serving benchmark indexes the final model only, not a training run: {store.path}")
        index_s = time.perf_counter() - started
        store_bytes = store.rows * store.manifest.width * 4
        queries = [
            {"prompt": " ".join(text.split()[:6]), "completion": " " + " ".join(text.split()[6:14])}
            for text in random_corpus(64, 14, vocabulary=500, seed=1)
        ]

        ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.2", logging_level=logging.ERROR)
        urls = {}
        for name, limits in VARIANTS.items():
            config = parse_config(dict(raw, serve=dict(limits, port=8765, replica_cpus=1, batch_wait_s=0.005)))
            urls[name] = start_service(config, name=name, route_prefix=f"/{name}")
        for url in urls.values():  # warm-up: first request of each replica
            run_load(url, 1, 4, queries)

        samples = {
            name: {c: {"rps": [], "latencies": [], "passes": 0, "requests": 0} for c in CONCURRENCY}
            for name in VARIANTS
        }
        for round_ in range(args.rounds):
            for clients in CONCURRENCY:
                order = list(VARIANTS) if round_ % 2 == 0 else list(reversed(VARIANTS))
                for name in order:
                    with AttributionClient(urls[name]) as observer:
                        before = observer.info()["replica"]
                    wall, latencies = run_load(urls[name], clients, args.requests, queries)
                    with AttributionClient(urls[name]) as observer:
                        after = observer.info()["replica"]
                    cell = samples[name][clients]
                    cell["rps"].append(len(latencies) / wall)
                    cell["latencies"] += latencies
                    cell["passes"] += after["scoring_passes"] - before["scoring_passes"]
                    cell["requests"] += after["requests"] - before["requests"]
                    print(f"round {round_} {name:<8} clients {clients:>2}: {len(latencies) / wall:6.1f} req/s")

        table = {}
        for name in VARIANTS:
            table[name] = {}
            for clients in CONCURRENCY:
                cell = samples[name][clients]
                table[name][str(clients)] = {
                    "requests_per_s_median": round(statistics.median(cell["rps"]), 2),
                    "p50_ms": round(1000 * percentile(cell["latencies"], 50), 1),
                    "p99_ms": round(1000 * percentile(cell["latencies"], 99), 1),
                    "requests_per_scoring_pass": round(cell["requests"] / max(1, cell["passes"]), 2),
                    "requests_per_s_samples": [round(x, 2) for x in cell["rps"]],
                }
        gain = {
            str(c): round(
                table["batched"][str(c)]["requests_per_s_median"] / table["single"][str(c)]["requests_per_s_median"], 2
            )
            for c in CONCURRENCY
        }
        print(
            f"store: {store.rows} rows x {store.manifest.width} ({store_bytes / 2**20:.0f} MiB float32), "
            f"indexed in {index_s:.0f} s"
        )
        print(f"{'variant':<8} {'clients':>7} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'req/pass':>8}")
        for name in VARIANTS:
            for clients in CONCURRENCY:
                row = table[name][str(clients)]
                print(
                    f"{name:<8} {clients:>7} {row['requests_per_s_median']:>7} {row['p50_ms']:>7} "
                    f"{row['p99_ms']:>7} {row['requests_per_scoring_pass']:>8}"
                )
        print(f"batching gain (req/s batched / single): {gain}")
        path = write_result(
            "serving",
            {
                "rows": store.rows,
                "width": store.manifest.width,
                "store_mib": round(store_bytes / 2**20, 1),
                "model": "GPT-2-like, hidden 64, 2 layers",
                "projection_dim": args.dim,
                "method": "if (kfac)",
                "requests_per_measurement": args.requests,
                "rounds": args.rounds,
                "top_k": 10,
                "queries_per_request": 1,
                "results": table,
                "batching_gain": gain,
                "variants": VARIANTS,
                "batch_wait_s": 0.005,
                "load_average": {
                    "start": [round(x, 2) for x in load_at_start],
                    "end": [round(x, 2) for x in os.getloadavg()],
                },
            },
        )
        print(f"wrote {path}")
    finally:
        try:
            from ray import serve

            serve.shutdown()
            ray.shutdown()
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
