"""Does the store find exact EK-FAC's top rows? Recall of the exact top-10 within each store's top-K, at equal
bytes per row, for each projection kind (issue 30), on a small version of issue 13's model.

Workload (reduced so it runs in minutes on a small shared CPU machine): the Hamlet-window GPT-2 of
`benchmarks/lm_lds_task.py` at 2 layers, hidden 64, trained 4 epochs on N training windows of 32 tokens;
32 held-out windows as queries; float32; empirical Fisher; method if with the default damping
(0.1 x mean eigenvalue per module).

Exact EK-FAC: `tributary query --exact` on a store indexed with `exact: {factors: true}`. The same store's
full-width Λ is what `projection.budget.measured_on` reads for the budgeted kinds.

Variants at the bytes per row of 16 x 16 float32 per module (1x) and 4x that:
  rademacher dim k           the default kind (k = 16, 32)
  gaussian dim k
  budget B                   rademacher with B = k² x modules numbers split by effective dimension
  kfac_eigen / eigen_sketch  the fitted kinds at dim k (fit: exact, all rows)
  bf16 ...                   bfloat16 rows at twice the numbers: budget 2B, and rademacher at dim ⌊k√2⌋

Per variant, over the queries: top-10 overlap with exact; recall of the exact top-10 within the store's top-K
for K in {10, 50, 100, 200}; Spearman over all rows; index wall time over a bare forward+backward over the rows.
All in this process, one round, on a machine shared with other work: timings are indicative.

Usage: python -m benchmarks.recall [--rows 512] [--result recall]
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import bare_pass_seconds, first_line, machine, mean_spearman, write_jsonl, write_result
from benchmarks.lm_lds_task import Architecture, Recipe, TaskSpec, build_task, save_full_model

QUERIES, WINDOW, BATCH = 32, 32, 32
CUTOFFS = (10, 50, 100, 200)


def _config(work: Path, name: str, projection: dict, dtype: str = "float32", exact: bool = False):
    from engine.config import parse_config

    raw = {
        "model": {"path": str(work / "model"), "dtype": "float32"},
        "data": {"train": str(work / "train.jsonl"), "max_length": WINDOW, "batch_size": BATCH},
        "projection": projection,
        "curvature": {"strategy": "ekfac", "fisher": "empirical"},
        "method": {"name": "if"},
        "store": {"path": str(work / f"{name}.zarr"), "dtype": dtype},
    }
    if exact:
        raw["exact"] = {"factors": True}
    return parse_config(raw)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Best first, ties to the lower row (the store's order)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def measures(scores: np.ndarray, exact: np.ndarray) -> dict:
    truth = _top(exact, 10)
    out = {"top10_overlap": float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(_top(scores, 10), truth)]))}
    for k in CUTOFFS:
        found = _top(scores, min(k, scores.shape[1]))
        out[f"recall_top10_in_top{k}"] = float(np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)]))
    out["spearman"] = mean_spearman(scores, exact)
    return out


def variants(modules: int, measured: str) -> dict[str, tuple[dict, str]]:
    """name → (projection section, store dtype) at 1x and 4x the bytes of 16 x 16 float32 per module."""
    out: dict[str, tuple[dict, str]] = {}
    for scale, k in (("1x", 16), ("4x", 32)):
        numbers = k * k * modules
        out[f"{scale} rademacher dim {k}"] = ({"dim": k}, "float32")
        out[f"{scale} gaussian dim {k}"] = ({"dim": k, "kind": "gaussian"}, "float32")
        out[f"{scale} budget {numbers}"] = (
            {"budget": {"numbers_per_row": numbers, "measured_on": measured}},
            "float32",
        )
        out[f"{scale} kfac_eigen dim {k}"] = ({"dim": k, "kind": "kfac_eigen"}, "float32")
        out[f"{scale} eigen_sketch dim {k}"] = ({"dim": k, "kind": "eigen_sketch"}, "float32")
        out[f"{scale} bf16 budget {2 * numbers}"] = (
            {"budget": {"numbers_per_row": 2 * numbers, "measured_on": measured}},
            "bfloat16",
        )
        wide = int(k * math.sqrt(2))
        out[f"{scale} bf16 rademacher dim {wide}"] = ({"dim": wide}, "bfloat16")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--rows", type=int, default=512, help="training windows N")
    parser.add_argument("--result", default="recall", help="name of the JSON under benchmarks/results/")
    parser.add_argument("--only", default=None, help="run only variants whose name contains this")
    args = parser.parse_args()
    logging.disable(logging.INFO)
    from engine.config import QueryOptions
    from engine.local_or_ray import run_exact, run_index, run_query
    from engine.store import GradientStore

    spec = TaskSpec(
        train=args.rows,
        queries=QUERIES,
        window=WINDOW,
        architecture=Architecture(layers=2, hidden=64, heads=4),
        recipe=Recipe(epochs=4),
    )
    work = Path(tempfile.mkdtemp(prefix="tributary-recall-"))
    try:
        task = build_task(spec)
        save_full_model(task, work / "model")
        write_jsonl(work / "train.jsonl", list(task.train_texts))
        queries = str(write_jsonl(work / "queries.jsonl", list(task.query_texts)))
        reference = _config(work, "exact", {"dim": 16}, exact=True)
        bare_pass_seconds(reference, BATCH)  # warm-up: the first pass pays for thread pools and allocations
        bare = bare_pass_seconds(reference, BATCH)
        started = time.perf_counter()
        store = run_index(reference, show_progress=False)
        reference_index_s = time.perf_counter() - started
        assert isinstance(store, GradientStore)
        modules = len(store.manifest.projection.modules)
        started = time.perf_counter()
        exact = run_exact(reference, queries, QueryOptions(k=10)).scores
        exact_s = time.perf_counter() - started
        rows: dict[str, dict] = {}
        for name, (projection, dtype) in variants(modules, str(reference.store.path)).items():
            if args.only and args.only not in name:
                continue
            config = _config(work, name.replace(" ", "_"), projection, dtype)
            started = time.perf_counter()
            built = run_index(config, show_progress=False)
            index_s = time.perf_counter() - started
            assert isinstance(built, GradientStore)
            scores = run_query(config, queries, 10, options=QueryOptions(k=10)).total
            assert scores is not None
            manifest = built.manifest
            row_bytes = manifest.width * (2 if dtype == "bfloat16" else 4)
            rows[name] = {
                "numbers_per_row": manifest.width,
                "bytes_per_row": row_bytes,
                "k_per_module": {m.name: [m.k_in, m.k_out] for m in manifest.projection.modules},
                **{key: round(value, 4) for key, value in measures(np.asarray(scores), exact).items()},
                "index_s": round(index_s, 2),
                "index_x_bare": round(index_s / bare, 2),
            }
            shown = {k: v for k, v in rows[name].items() if k != "k_per_module"}
            print(f"{name:<32} {shown}", flush=True)
        path = write_result(
            args.result,
            {
                "task": task.summary(),
                "machine": machine(),
                "modules": modules,
                "bytes_per_row_1x": 16 * 16 * 4 * modules,
                "bare_forward_backward_s": round(bare, 3),
                "exact_store_index_s": round(reference_index_s, 2),
                "exact_query_s": round(exact_s, 2),
                "results": rows,
            },
        )
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
