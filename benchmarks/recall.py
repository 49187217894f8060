"""Does the store find exact EK-FAC's top rows? Recall of the exact top-10 within each store's top-K, at equal
bytes per row, for each projection kind (issue 30), and the accuracy and cost of `--rescore K` (issue 29).

Workload: issue 13's model, a GPT-2-like model of 4 layers x 256 wide (untrained, vocabulary of the corpus), on
N rows of a random corpus of `--window` words (32 by default, not issue 13's 128: a pass at 128 tokens does not
fit in the time on a loaded 2-core machine), 32 queries, batch 32, float32, empirical Fisher, method if with the
default damping (0.1 x mean eigenvalue per module). `--layers/--hidden` give smaller models.

Exact EK-FAC: `tributary query --exact` on the dim-16 rademacher store indexed with `exact: {factors: true}`
(its rows are also the "1x rademacher dim 16" variant, its full-width Λ what `projection.budget.measured_on`
reads). The exact scores are computed once and kept in the cache directory, so every variant reuses them.

Variants at the bytes per row of 16 x 16 float32 per module (1x) and 4x that (`--scales`):
  rademacher dim k           the default kind (k = 16, 32)
  budget B                   rademacher with B = k² x modules numbers split by effective dimension
                             (measured_on: the exact store's Λ)
  budget-fit B               the same split measured by the index's own fit pass on 128 of the rows (fit_rows; no
                             prior store; engine.indexing.budget_fit)
  grad_pca dim k             the in-sample fitted kind: each side's top-k eigenvectors of the rows' own per-example
                             gradient Grams, fitted on 128 of the rows (fit_rows)
  grad_pca_whitened dim k    the same of the K-FAC-whitened gradients S^-1/2 G A^-1/2 (two sweeps over the 128 fit
                             rows; engine.projection.whitened)
  kfac_eigen / eigen_sketch  the fitted kinds at dim k (fit: exact, all rows)
  bf16 ...                   bfloat16 rows at twice the numbers: budget 2B, and rademacher at dim ⌊k√2⌋

Per variant, over the queries: top-10 overlap with exact; recall of the exact top-10 within the store's top-K
for K in {10, 50, 100, 200}; Spearman over all rows; index wall time over a bare forward+backward over the rows.

Accuracy table (issue 29): the dim-16 store alone, `--rescore K` for K in {50, 100, 200, 500}, and `--exact`,
each with its top-10 overlap with exact, Spearman, and the seconds of one query batch over bare (the factors
and the store are built once and shared; the index costs are in the variants' table). Each --rescore K is
computed from the cached store and exact scores as engine.exact.run ranks it (the union over queries of the
store's top-K and bottom-K scored exactly), its cost estimated as the store query plus the exact pass's time
per row for the rows it scores; `--measure-rescore` runs them (K = 50 was run on 512 rows to check the
simulation: results/recall_512.json).

All in this process, one round, on a shared, loaded machine: timings are indicative. Results are written after
every variant, and a rerun with the same `--cache` skips what is there.

Usage: python -m benchmarks.recall [--rows 512] [--result recall] [--cache /tmp/recall-512]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    bare_pass_seconds,
    first_line,
    gpt2_like,
    mean_spearman,
    random_corpus,
    ratio_table,
    top_overlap,
    write_jsonl,
    write_result,
)

CUTOFFS = (10, 50, 100, 200)
RESCORE = (50, 100, 200, 500)
BATCH = 32
FIT_ROWS = 128  # budget-fit: the measurement pass on every ⌈N/128⌉-th row


def _config(work: Path, name: str, projection: dict, dtype: str = "float32", exact: bool = False, window: int = 32):
    from engine.config import parse_config

    raw = {
        "model": {"path": str(work / "model"), "dtype": "float32"},
        "data": {"train": str(work / "train.jsonl"), "max_length": window + 2, "batch_size": BATCH},
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
    out = {"top10_overlap": top_overlap(_top(scores, 10), truth)}
    for k in CUTOFFS:
        found = _top(scores, min(k, scores.shape[1]))
        out[f"recall_top10_in_top{k}"] = float(np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)]))
    out["spearman"] = mean_spearman(scores, exact)
    return out


def variants(modules: int, measured: str, scales: list[str]) -> dict[str, tuple[dict, str]]:
    """name → (projection section, store dtype) at 1x and 4x the bytes of 16 x 16 float32 per module, the cheapest
    and newest first (on a loaded machine the last ones may not run)."""
    out: dict[str, tuple[dict, str]] = {}
    for scale, k in (("1x", 16), ("4x", 32)):
        if scale not in scales:
            continue
        numbers = k * k * modules
        if scale != "1x":  # 1x rademacher dim 16: the reference store's own rows
            out[f"{scale} rademacher dim {k}"] = ({"dim": k}, "float32")
        fitted = {"fit_rows": FIT_ROWS}
        bf16_k = int(k * math.sqrt(2))
        out[f"{scale} grad_pca dim {k}"] = ({"dim": k, "kind": "grad_pca", **fitted}, "float32")
        out[f"{scale} grad_pca_whitened dim {k}"] = ({"dim": k, "kind": "grad_pca_whitened", **fitted}, "float32")
        out[f"{scale} bf16 grad_pca dim {bf16_k}"] = ({"dim": bf16_k, "kind": "grad_pca", **fitted}, "bfloat16")
        out[f"{scale} budget-fit {numbers}"] = ({"budget": {"numbers_per_row": numbers, **fitted}}, "float32")
        out[f"{scale} bf16 budget-fit {2 * numbers}"] = (
            {"budget": {"numbers_per_row": 2 * numbers, **fitted}},
            "bfloat16",
        )
        out[f"{scale} kfac_eigen dim {k}"] = ({"dim": k, "kind": "kfac_eigen"}, "float32")
        out[f"{scale} bf16 rademacher dim {int(k * math.sqrt(2))}"] = ({"dim": int(k * math.sqrt(2))}, "bfloat16")
        out[f"{scale} budget {numbers}"] = (
            {"budget": {"numbers_per_row": numbers, "measured_on": measured}},
            "float32",
        )
        out[f"{scale} eigen_sketch dim {k}"] = ({"dim": k, "kind": "eigen_sketch"}, "float32")
    return out


class Cache:
    """The cache directory's state.json (figures) and .npy score matrices, so a rerun skips finished work."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "state.json"
        self.state: dict = json.loads(self.path.read_text()) if self.path.exists() else {}

    def save(self) -> None:
        self.path.write_text(json.dumps(self.state, indent=1))

    def figure(self, key: str, compute):
        if key not in self.state:
            self.state[key] = compute()
            self.save()
        return self.state[key]

    def scores(self, name: str, compute) -> np.ndarray:
        path = self.root / f"{name.replace(' ', '_')}.npy"
        if not path.exists():
            np.save(path, np.asarray(compute(), dtype=np.float64))
        return np.load(path)


def _timed(call):
    started = time.perf_counter()
    value = call()
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--rows", type=int, default=512, help="training rows N")
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--window", type=int, default=32, help="words per row")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--scales", default="1x,4x", help="byte budgets to run: 1x, 4x or both")
    parser.add_argument("--no-rescore", action="store_true", help="skip the --rescore accuracy table")
    parser.add_argument(
        "--measure-rescore", action="store_true", help="run each --rescore K (default: from the cached scores)"
    )
    parser.add_argument("--result", default="recall", help="name of the JSON under benchmarks/results/")
    parser.add_argument("--cache", default=None, help="directory kept between runs (default: /tmp/recall-<rows>)")
    parser.add_argument(
        "--only", default=None, help="run only variants whose name contains one of these (comma-separated)"
    )
    args = parser.parse_args()
    logging.disable(logging.INFO)
    from engine.config import QueryOptions
    from engine.local_or_ray import run_exact, run_index, run_query
    from engine.store import GradientStore

    work = Path(args.cache or f"/tmp/recall-{args.rows}")
    cache = Cache(work)
    if not (work / "queries.jsonl").exists():
        texts = random_corpus(args.rows, args.window, vocabulary=2000)
        gpt2_like(work / "model", texts, hidden=args.hidden, layers=args.layers, heads=4, positions=args.window + 2)
        write_jsonl(work / "train.jsonl", texts)
        write_jsonl(work / "queries.jsonl", random_corpus(args.queries, args.window, vocabulary=2000, seed=1))
    queries = str(work / "queries.jsonl")
    options = QueryOptions(k=10)
    reference = _config(work, "exact", {"dim": 16}, exact=True, window=args.window)
    bare = cache.figure("bare_s", lambda: bare_pass_seconds(reference, BATCH))

    def index_reference() -> dict:
        store, seconds = _timed(lambda: run_index(reference, show_progress=False))
        assert isinstance(store, GradientStore)
        return {
            "seconds": seconds,
            "timings": store.manifest.timings,
            "modules": len(store.manifest.projection.modules),
        }

    built = cache.figure("exact_store", index_reference)
    if "exact_query_s" not in cache.state:
        answer, cache.state["exact_query_s"] = _timed(lambda: run_exact(reference, queries, options))
        cache.scores("exact", lambda: answer.scores)
        cache.save()
    exact_s = cache.state["exact_query_s"]
    exact = cache.scores("exact", lambda: run_exact(reference, queries, options).scores)
    modules = built["modules"]
    payload = {
        "workload": {
            "rows": args.rows,
            "queries": args.queries,
            "words_per_row": args.window,
            "layers": args.layers,
            "hidden": args.hidden,
            "batch": BATCH,
        },
        "modules": modules,
        "bytes_per_row_1x": 16 * 16 * 4 * modules,
        "bare_forward_backward_s": round(bare, 3),
        "exact_store_index": built,
        "exact_query_s": round(exact_s, 2),
    }
    if not args.no_rescore:
        payload["accuracy"] = _accuracy_table(
            cache, reference, queries, options, exact, exact_s, bare, args.measure_rescore
        )
        write_result(args.result, payload)
    rows: dict[str, dict] = cache.state.setdefault("variants", {})
    if "1x" in args.scales and "1x rademacher dim 16" not in rows:
        stored = cache.scores("1x rademacher dim 16", lambda: run_query(reference, queries, 10, options=options).total)
        store = GradientStore.open(reference.store.path)
        timings = store.manifest.timings
        assert timings is not None, "a complete store records its timings"
        seconds = timings["total_s"]  # without the exact factors, fitted after
        rows["1x rademacher dim 16"] = {
            "numbers_per_row": store.manifest.width,
            "bytes_per_row": store.manifest.width * 4,
            **{key: round(value, 4) for key, value in measures(stored, exact).items()},
            "index_s": round(seconds, 2),
            "index_x_bare": round(seconds / bare, 2),
        }
        cache.save()
    for name, (projection, dtype) in variants(modules, str(reference.store.path), args.scales.split(",")).items():
        if (args.only and not any(part in name for part in args.only.split(","))) or name in rows:
            continue
        try:
            config = _config(work, name.replace(" ", "_"), projection, dtype, window=args.window)
            store, index_s = _timed(lambda config=config: run_index(config, show_progress=False))
        except Exception as error:  # a variant this tree cannot build yet: said, and the others still run
            print(f"{name:<32} not run: {first_line(str(error))}", flush=True)
            continue
        assert isinstance(store, GradientStore)
        total = run_query(config, queries, 10, options=options).total
        assert total is not None
        scores = cache.scores(name, lambda total=total: total)
        manifest = store.manifest
        rows[name] = {
            "numbers_per_row": manifest.width,
            "bytes_per_row": manifest.width * (2 if dtype == "bfloat16" else 4),
            "k_per_module": {m.name: [m.k_in, m.k_out] for m in manifest.projection.modules},
            **{key: round(value, 4) for key, value in measures(scores, exact).items()},
            "index_s": round(index_s, 2),
            "index_x_bare": round(index_s / bare, 2),
        }
        cache.save()
        print(f"{name:<32} { ({k: v for k, v in rows[name].items() if k != 'k_per_module'}) }", flush=True)
        write_result(args.result, {**payload, "results": rows})
    path = write_result(args.result, {**payload, "results": rows})
    print(f"wrote {path}")


def rescored(stored: np.ndarray, exact: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What `--rescore k` returns, from the store's and the exact scores: the union over queries of each query's
    store top-k and bottom-k is scored exactly, the rest keeps the store's score; each query's top-10 is ranked
    among the exactly scored rows (engine.exact.run). Returns (scores, the exactly scored columns)."""
    order = np.argsort(-stored, axis=1, kind="stable")
    chosen = np.zeros(stored.shape[1], dtype=bool)
    chosen[order[:, :k].ravel()] = True
    chosen[order[:, -k:].ravel()] = True
    return np.where(chosen[None, :], exact, stored), chosen


def per_query_rescore(stored: np.ndarray, exact: np.ndarray, k: int) -> dict:
    """--rescore k with one query a batch: each query's own store top-k and bottom-k scored exactly (2k rows of N,
    where a batch of Q queries scores the union of theirs)."""
    order = np.argsort(-stored, axis=1, kind="stable")
    found, scored = [], []
    for q in range(len(exact)):
        chosen = np.zeros(exact.shape[1], dtype=bool)
        chosen[order[q, :k]] = chosen[order[q, -k:]] = True
        found.append(np.argsort(-np.where(chosen, exact[q], -np.inf), kind="stable")[:10])
        scored.append(int(chosen.sum()))  # 2k, or every row where 2k >= N
    return {"top10_overlap": top_overlap(found, _top(exact, 10)), "rows_scored_exactly": float(np.mean(scored))}


def _accuracy_table(
    cache: Cache, reference, queries: str, options, exact: np.ndarray, exact_s: float, bare: float, measured: bool
):
    """The dim-16 store alone, --rescore K and --exact: top-10 overlap, Spearman, one query batch's cost. Without
    `measured`, each --rescore K's answer is computed from the cached scores (`rescored`) and its cost estimated
    as the store's query plus the exact pass's time per row times the rows it scores."""
    from engine.local_or_ray import run_exact, run_query

    table: dict[str, dict] = cache.state.setdefault("accuracy", {})
    stored = cache.scores("1x rademacher dim 16", lambda: run_query(reference, queries, 10, options=options).total)
    if "dim 16 alone" not in table:
        _, seconds = _timed(lambda: run_query(reference, queries, 10, options=options))
        table["dim 16 alone"] = {"seconds": seconds, **measures(stored, exact)}
        cache.save()
    store_s = table["dim 16 alone"]["seconds"]
    for k in RESCORE:
        scores, chosen = rescored(stored, exact, k)
        ranked = np.where(chosen[None, :], exact, -np.inf)
        simulated = {
            "top10_overlap": top_overlap(_top(ranked, 10), _top(exact, 10)),
            "spearman": mean_spearman(scores, exact),
            "rows_scored_exactly": int(chosen.sum()),
        }
        if measured and f"rescore {k}" not in table:
            answer, seconds = _timed(lambda k=k: run_exact(reference, queries, options, rescore=k))
            table[f"rescore {k}"] = {
                "seconds": seconds,
                "top10_overlap": top_overlap(answer.result.top_indices, _top(exact, 10)),
                "spearman": mean_spearman(np.nan_to_num(answer.scores), exact),
                "rows_scored_exactly": int(answer.exact.sum()),
                "measured": True,
            }
        if not table.get(f"rescore {k}", {}).get("measured"):
            cost = store_s + exact_s * simulated["rows_scored_exactly"] / exact.shape[1]
            table[f"rescore {k}"] = {"seconds": cost, **simulated, "measured": False}
        else:
            table[f"rescore {k}"]["simulated"] = simulated
        cache.save()
        print(f"rescore {k}: {table[f'rescore {k}']}", flush=True)
        table[f"rescore {k}, one query at a time"] = {
            # estimated: one query's batch still costs about a pass over the rows it scores (the gradients of the
            # rows dominate), so its exact pass is --exact's time x (rows scored) / N
            **(alone := per_query_rescore(stored, exact, k)),
            "seconds": store_s + exact_s * alone["rows_scored_exactly"] / exact.shape[1],
            "measured": False,
        }
    table["exact"] = {"seconds": exact_s, "top10_overlap": 1.0, "spearman": 1.0}
    for row in table.values():
        row["of_exact"] = round(row["seconds"] / exact_s, 3)
    ratio_table(table, bare)
    return table


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
