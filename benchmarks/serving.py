"""Serving throughput and latency under locust: requests/s, p50/p95/p99 and errors at 1, 8, 32 and 128
users, with batching (up to 64 queries per scoring pass) and, optionally, without (batch size 1).

The services run on one Ray Serve proxy (one application per variant, /batched and /single), each one
replica holding the same model and store. The load is locust, headless, in its own process
(benchmarks/serving_locust.py: closed-loop users, one query per request, top 10), for --seconds at each
user count; with both variants they alternate so drift in machine speed hits both alike. Locust runs on the
same machine as the service.

The store: 600 rows of 24 words, projection dim 64 (32,768 floats per row, 75 MiB float32), K-FAC factors,
method `if`; a pass over it costs far more than a query's own gradient, as with any real store.

Usage: python -m benchmarks.serving [--rows 600] [--dim 64] [--seconds 60] [--users 1,8,32,128]
       [--variants batched,single]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
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

USERS = (1, 8, 32, 128)
VARIANTS = {
    "batched": {"batch_max_queries": 64, "max_queries_per_request": 32},
    "single": {"batch_max_queries": 1, "max_queries_per_request": 1},
}
WORDS_PER_ROW = 24
LOCUSTFILE = Path(__file__).with_name("serving_locust.py")


def locust_run(url: str, users: int, seconds: int, queries_file: Path, work: Path) -> dict:
    """One headless locust run of `users` users for `seconds` s: its totals from locust's CSV statistics."""
    prefix = work / f"locust-{users}"
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
        "--users", str(users), "--spawn-rate", str(users), "--run-time", f"{seconds}s", "--stop-timeout", "30",
        "--csv", str(prefix), "--only-summary", "--loglevel", "ERROR",
    ]  # fmt: skip
    environment = dict(os.environ, TRIBUTARY_LOCUST_QUERIES=str(queries_file))
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=seconds + 120)
    if done.returncode not in (0, 1):  # 1: some requests failed, counted below
        raise RuntimeError(f"locust exited {done.returncode}: {done.stderr[-2000:]}")
    with open(f"{prefix}_stats.csv") as stats:
        total = next(row for row in csv.DictReader(stats) if row["Name"] == "Aggregated")
    with open(f"{prefix}_failures.csv") as failures:
        errors = {row["Error"]: int(row["Occurrences"]) for row in csv.DictReader(failures)}
    return {
        "requests": int(total["Request Count"]),
        "failures": int(total["Failure Count"]),
        "errors": errors,
        "requests_per_s": round(float(total["Requests/s"]), 2),
        "p50_ms": float(total["50%"]),
        "p95_ms": float(total["95%"]),
        "p99_ms": float(total["99%"]),
        "max_ms": round(float(total["Max Response Time"]), 1),
    }


def counted(text: str) -> tuple[int, ...]:
    return tuple(positive_int(part) for part in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--rows", type=positive_int, default=600)
    parser.add_argument("--seconds", type=positive_int, default=60, help="load at each user count")
    parser.add_argument("--users", type=counted, default=USERS, help="comma-separated user counts")
    parser.add_argument("--variants", default="batched", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--dim", type=non_negative_int, default=64)
    args = parser.parse_args()
    variants = args.variants.split(",")
    if not set(variants) <= set(VARIANTS):
        parser.error(f"--variants: each of {', '.join(VARIANTS)}")
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
        queries_file = work / "queries.json"
        queries_file.write_text(json.dumps(queries))

        ray.init(
            num_cpus=4,
            include_dashboard=False,
            _node_ip_address="127.0.0.2",
            logging_level=logging.ERROR,
            log_to_driver=False,  # no access log line per request
        )
        urls = {}
        for name in variants:
            config = parse_config(dict(raw, serve=dict(VARIANTS[name], port=8765, replica_cpus=1, batch_wait_s=0.005)))
            urls[name] = start_service(config, name=name, route_prefix=f"/{name}")
        for url in urls.values():  # warm-up: the first requests of each replica
            with AttributionClient(url, timeout=300) as warm:
                for query in queries[:4]:
                    warm.attribute([query], top_k=10)

        table: dict[str, dict[str, dict]] = {name: {} for name in variants}
        for step, users in enumerate(args.users):
            for name in variants if step % 2 == 0 else list(reversed(variants)):
                with AttributionClient(urls[name]) as observer:
                    before = observer.info()["replica"]
                row = locust_run(urls[name], users, args.seconds, queries_file, work)
                with AttributionClient(urls[name]) as observer:
                    after = observer.info()["replica"]
                passes = after["scoring_passes"] - before["scoring_passes"]
                row["requests_per_scoring_pass"] = round((after["requests"] - before["requests"]) / max(1, passes), 2)
                table[name][str(users)] = row
                print(
                    f"{name:<8} users {users:>3}: {row['requests_per_s']:6.1f} req/s, p50/p95/p99 "
                    f"{row['p50_ms']:.0f}/{row['p95_ms']:.0f}/{row['p99_ms']:.0f} ms, {row['failures']} errors",
                    flush=True,
                )
        print(
            f"store: {store.rows} rows x {store.manifest.width} ({store_bytes / 2**20:.0f} MiB float32), "
            f"indexed in {index_s:.0f} s"
        )
        path = write_result(
            "serving",
            {
                "rows": store.rows,
                "width": store.manifest.width,
                "store_mib": round(store_bytes / 2**20, 1),
                "model": "GPT-2-like, hidden 64, 2 layers",
                "projection_dim": args.dim,
                "method": "if (kfac)",
                "load": "locust (headless, FastHttpUser, closed loop), same machine as the service",
                "seconds_per_step": args.seconds,
                "top_k": 10,
                "queries_per_request": 1,
                "results": table,
                "variants": {name: VARIANTS[name] for name in variants},
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
