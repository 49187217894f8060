"""Exact EK-FAC without full-width rows (`exact.factors` + `tributary query --exact` / `--rescore K`) side by
side with kronfluence's EK-FAC and a bare forward+backward, on a reduced workload (a quick figure, not issue
29's full one).

Workload: a GPT-2-like model of 2 layers, 64 wide (vocabulary of the corpus), 128 rows x 64 tokens, 8 queries,
batch 8, float32, true Fisher on both sides (their sampled labels come from different generators, so the
exact scores are compared by rank correlation; tests/test_exact_kronfluence.py shows equality with the
empirical Fisher). All in this process, one round: timings are indicative.

  bare            forward + loss.backward() over the rows
  kronfluence     fit_all_factors + compute_pairwise_scores (heuristic damping)
  index           `tributary index` at projection dim 16 with exact.factors (wall time, model load included):
                  pass 1 (dim-16 rows and covariances), Λ, then the full-width covariance and Λ passes
  exact           `query --exact`, the first batch of queries (query gradients + one pass over the rows)
  exact again     the same query again (the factors reused): the cost of a further batch
  rescore K       `query --rescore K`: the store's top/bottom K, re-scored exactly
  store           the dim-16 store's own query

Overlap: the mean over queries of |top-10 ∩ exact top-10| / 10; Spearman: the mean over queries of the rank
correlation over training rows with kronfluence's scores (or with --exact's).

Usage: python -m benchmarks.exact [--result exact]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    bare_pass_seconds,
    first_line,
    gpt2_like,
    mean_spearman,
    print_table,
    random_corpus,
    ratio_table,
    top_overlap,
    write_jsonl,
    write_result,
)
from benchmarks.kronfluence_side import kronfluence_scores

ROWS, QUERIES, SEQUENCE, BATCH, HIDDEN, LAYERS = 128, 8, 64, 8, 64, 2
RESCORE = (10, 25, 50)


def _config(work: Path, model: Path, train: Path):
    from engine.config import parse_config

    return parse_config(
        {
            "model": {"path": str(model), "dtype": "float32"},
            "data": {"train": str(train), "max_length": SEQUENCE + 2, "batch_size": BATCH},
            "projection": {"dim": 16},
            "curvature": {"strategy": "ekfac"},
            "method": {"name": "if"},
            "store": {"path": str(work / "store.zarr"), "dtype": "float32"},
            "exact": {"factors": True},
        }
    )


def _timed(call):
    started = time.perf_counter()
    value = call()
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    parser.add_argument("--result", default="exact", help="name of the JSON under benchmarks/results/")
    args = parser.parse_args()
    logging.disable(logging.INFO)
    from engine.config import QueryOptions
    from engine.runner import run_exact, run_index, run_query

    work = Path(tempfile.mkdtemp(prefix="tributary-exact-"))
    try:
        texts = random_corpus(ROWS, SEQUENCE, vocabulary=2000)
        model = gpt2_like(work / "model", texts, hidden=HIDDEN, layers=LAYERS, heads=4, positions=SEQUENCE + 2)
        train = write_jsonl(work / "train.jsonl", texts)
        queries = str(write_jsonl(work / "queries.jsonl", random_corpus(QUERIES, SEQUENCE, vocabulary=2000, seed=1)))
        config = _config(work, model, train)
        bare = bare_pass_seconds(config, BATCH)
        theirs, kron_s = kronfluence_scores(config, queries, BATCH, work / "kronfluence")
        store, index_s = _timed(lambda: run_index(config, show_progress=False))
        options = QueryOptions(k=10)
        exact, exact_s = _timed(lambda: run_exact(config, queries, options))
        _, again_s = _timed(lambda: run_exact(config, queries, options))
        stored, store_s = _timed(lambda: run_query(config, queries, 10, options=options))
        reference = exact.result.top_indices
        rows = {
            "bare": {"seconds": bare},
            "kronfluence": {"seconds": kron_s},
            "index (dim 16 + exact factors)": {"seconds": index_s, "timings": store.manifest.timings},
            "exact": {"seconds": exact_s, "spearman_vs_kronfluence": mean_spearman(exact.scores, theirs)},
            "exact again": {"seconds": again_s},
            "store (dim 16)": {
                "seconds": store_s,
                "top10_overlap_with_exact": top_overlap(stored.top_indices, reference),
                "spearman_vs_exact": mean_spearman(np.asarray(stored.total), exact.scores),
            },
        }
        for k in RESCORE:
            rescored, seconds = _timed(lambda k=k: run_exact(config, queries, options, rescore=k))
            rows[f"rescore {k}"] = {
                "seconds": seconds,
                "top10_overlap_with_exact": top_overlap(rescored.result.top_indices, reference),
                "rows_scored_exactly": int(rescored.exact.sum()),
            }
        ratio_table(rows, bare)
        first = (index_s + exact_s) / kron_s
        print(
            f"{ROWS} rows x {SEQUENCE} tokens, {QUERIES} queries; (index + first exact batch) / kronfluence: {first:.2f}"
        )
        print_table(rows)
        path = write_result(
            args.result,
            {
                "rows": ROWS,
                "queries": QUERIES,
                "sequence": SEQUENCE,
                "batch": BATCH,
                "hidden": HIDDEN,
                "layers": LAYERS,
                "index_plus_first_exact_over_kronfluence": round(first, 3),
                "results": rows,
            },
        )
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
