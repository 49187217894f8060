"""Exact streamed EK-FAC scores from a store that holds no full-width rows (dim 4, full-width factors beside it)
against kronfluence's EK-FAC pairwise scores, an independent library, driven by tests/reference.py
`KronfluenceEkfac` as in tests/spectral/test_kronfluence.py (whose docstring explains why the constant factor
is 1)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.config import MethodConfig, QueryOptions
from engine.local_or_ray import run_exact, run_index
from tests.conftest import write_jsonl
from tests.reference import KRONFLUENCE_QUERIES, KronfluenceEkfac, mixed_train
from tests.requirements import require

kronfluence = require("kronfluence")


@pytest.mark.heavy  # kronfluence's factors and scores, then an index and the exact pass: ~35 s on 2 cores
def test_exact_scores_match_kronfluence(tiny_models, make_config, tmp_path):
    train = mixed_train(tmp_path / "mixed_train.jsonl")
    queries = write_jsonl(tmp_path / "queries.jsonl", KRONFLUENCE_QUERIES)
    config = make_config(
        tiny_models["gpt2"],
        train,
        projection={"dim": 4},
        curvature={"strategy": "ekfac", "fisher": "empirical"},
        exact={"factors": True},
    ).with_method(MethodConfig(name="if", damping=None))
    theirs = KronfluenceEkfac.fit(config, tmp_path / "kronfluence").pairwise_scores(queries, damping=None)
    run_index(config, show_progress=False)
    ours = run_exact(config, str(queries), QueryOptions(k=3)).scores
    assert ours.shape == theirs.shape and np.abs(theirs).max() > 0
    pearson = float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1])
    relative = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
    assert pearson >= 0.9999, pearson
    assert relative <= 1e-6, relative
