"""Subset-removal counterfactual (SOURCE §5.4; kronfluence's run_counterfactual).

For each query, remove its k highest-scoring training examples (its strongest supporters), retrain from
scratch over R seeds, and measure that query. Classification: among the queries every base seed gets
right, the fraction flipped (mean correctness over seeds < 0.5; once flipped at some k, flipped for every
larger k). Regression and language modelling: the mean increase of the query's loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.errors import TributaryError
from engine.evaluation.jobs import execute
from engine.evaluation.training import RunSpec
from engine.query.scoring import top_k


def subset_removal(
    task, scores: np.ndarray, k_values: Sequence[int], seeds: int = 3, seed: int = 0, workers: int = 0
) -> dict:
    n, q = len(task.train), len(task.queries)
    scores = np.asarray(scores, np.float64)
    if scores.shape != (q, n):
        raise TributaryError(f"scores have shape {scores.shape}; subset removal needs (queries, train) = {(q, n)}")
    if not k_values or min(k_values) < 1 or max(k_values) >= n:
        raise TributaryError(f"removal sizes k must lie in 1..{n - 1} (got {list(k_values)})")
    what = "correct" if task.counts_flips else "loss"
    run_seeds = [50_000 * (seed + 1) + r for r in range(seeds)]
    base = execute(
        task, [RunSpec(seed=s, init_seed=s) for s in run_seeds], task.recipe, [task.recipe.steps], None, what, workers
    )[:, 0]  # (R, Q)
    order = top_k(scores, max(k_values))
    runs = []
    for k in k_values:
        for query in range(q):
            keep = np.ones(n, bool)
            keep[order[query, :k]] = False
            runs.extend(RunSpec(seed=s, keep=keep, init_seed=s) for s in run_seeds)
    values = execute(task, runs, task.recipe, [task.recipe.steps], None, what, workers)[:, 0]
    values = values.reshape(len(k_values), q, seeds, q)
    own = values[:, np.arange(q), :, np.arange(q)].transpose(1, 0, 2).mean(axis=2)  # (K, Q): query q's own value
    if task.counts_flips:
        eligible = base.min(axis=0) == 1.0
        flipped = np.maximum.accumulate(own < 0.5, axis=0)[:, eligible]
        return {
            "k": list(k_values),
            "metric": "fraction flipped",
            "eligible_queries": int(eligible.sum()),
            "value": flipped.mean(axis=1).tolist() if eligible.any() else [float("nan")] * len(k_values),
        }
    change = own - base.mean(axis=0)[None, :]
    return {
        "k": list(k_values),
        "metric": "query loss increase",
        "eligible_queries": q,
        "value": change.mean(axis=1).tolist(),
        "sem": (change.std(axis=1, ddof=1) / np.sqrt(q)).tolist(),
    }
