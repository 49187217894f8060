"""On a small LM LDS task (benchmarks/lm_lds_task.py, configs from benchmarks/lm_lds.py), `--exact` from a
projected store with full-width factors gives the dim-0 store's scores, and so the same LDS: the exact path is
the dim-0 answer without storing the rows."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import lm_lds
from benchmarks.lm_lds_task import Architecture, Recipe, TaskSpec, build_task
from engine.config import QueryOptions, parse_config
from engine.evaluation.lds import lds_per_query
from engine.local_or_ray import run_exact, run_index, run_query

TINY = TaskSpec(
    train=16,
    queries=4,
    window=8,
    architecture=Architecture(layers=1, hidden=16, heads=2),
    recipe=Recipe(epochs=2, learning_rate=3e-3, batch_size=4),
)


def _config(work, dim: int, **exact) -> dict:
    kind = "exact" if dim == 0 else "rademacher"
    raw = lm_lds.job_config(lm_lds.Setting("ekfac", kind, dim), work, fit_rows=None, window=TINY.window)
    raw["model"]["dtype"] = raw["store"]["dtype"] = "float64"  # 1e-10 in float64; float32 agrees to ~1e-6
    if exact:
        raw["exact"] = exact
    return raw


@pytest.mark.parametrize(
    "fisher",
    [  # about 7 s a case once imported: two indexes and eight retrainings; the benchmark's own Fisher by default
        pytest.param(True, id="true_fisher"),
        pytest.param("empirical", id="empirical_fisher", marks=pytest.mark.heavy),
    ],
)
def test_exact_scores_give_the_dim0_stores_lds(fisher, tmp_path):
    task = build_task(TINY)
    work = tmp_path / "work"
    lm_lds.prepare_workdir(task, work)
    queries = str(work / "queries.jsonl")
    stored_raw, exact_raw = _config(work, 0), _config(work, 4, factors=True)
    for raw in (stored_raw, exact_raw):
        raw["curvature"]["fisher"] = fisher
    stored_config, exact_config = parse_config(stored_raw), parse_config(exact_raw)
    run_index(stored_config, show_progress=False)
    run_index(exact_config, show_progress=False)
    stored = run_query(stored_config, queries, k=3).total
    assert stored is not None
    exact = run_exact(exact_config, queries, QueryOptions(k=3)).scores
    assert np.linalg.norm(exact - stored) <= 1e-10 * np.linalg.norm(stored)

    truth, _ = lm_lds.ground_truth(task, 0.5, subsets=8, seeds=1, workers=0, cache=None)
    ours, theirs = lds_per_query(exact, truth), lds_per_query(stored, truth)
    assert np.isfinite(theirs).all()
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
