"""Exact streamed EK-FAC scores from a store that holds no full-width rows (dim 4, full-width factors beside it)
against kronfluence's EK-FAC pairwise scores, an independent library, driven as in tests/test_kronfluence.py
(whose docstring explains why the constant factor is 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.kronfluence_side import RowDataset, causal_lm_task, conv1d_to_linear
from engine.config import MethodConfig, QueryOptions
from engine.data.rows import field_names, read_rows
from engine.gradients.context import prepare_index_job
from engine.local_or_ray import run_exact, run_index
from engine.model.loading import load_model
from tests.conftest import write_jsonl
from tests.test_kronfluence import QUERIES, _mixed_train

kronfluence = pytest.importorskip("kronfluence")
from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.utils.dataset import DataLoaderKwargs  # noqa: E402


def _kronfluence_scores(config, queries, tmp_path) -> np.ndarray:
    job = prepare_index_job(config)
    names = list(job.context.modules)
    model, _ = load_model(config.model, torch.device("cpu"))
    conv1d_to_linear(model, names)
    task = causal_lm_task(names, true_fisher=False)
    model = prepare_model(model, task)
    analyzer = Analyzer(
        analysis_name="exact",
        model=model,
        task=task,
        cpu=True,
        disable_tqdm=True,
        output_dir=str(tmp_path / "kronfluence"),
        disable_model_save=True,
    )
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
    f64 = torch.float64
    analyzer.fit_all_factors(
        "ekfac",
        dataset=RowDataset(job.tokenized, job.context.pad_id),
        per_device_batch_size=5,
        factor_args=FactorArguments(
            strategy="ekfac",
            use_empirical_fisher=True,
            activation_covariance_dtype=f64,
            gradient_covariance_dtype=f64,
            eigendecomposition_dtype=f64,
            per_sample_gradient_dtype=f64,
            lambda_dtype=f64,
        ),
        overwrite_output_dir=True,
    )
    query_rows = job.context.tokenize(read_rows(queries, field_names(config)), str(queries))
    analyzer.compute_pairwise_scores(
        "scores",
        "ekfac",
        query_dataset=RowDataset(query_rows, job.context.pad_id),
        train_dataset=RowDataset(job.tokenized, job.context.pad_id),
        per_device_query_batch_size=2,
        per_device_train_batch_size=4,
        score_args=ScoreArguments(
            damping_factor=None, per_sample_gradient_dtype=f64, precondition_dtype=f64, score_dtype=f64
        ),
        overwrite_output_dir=True,
    )
    scores = analyzer.load_pairwise_scores("scores")
    assert scores is not None
    return scores["all_modules"].to(f64).numpy()


@pytest.mark.heavy  # kronfluence's factors and scores, then an index and the exact pass: ~35 s on 2 cores
def test_exact_scores_match_kronfluence(tiny_models, make_config, tmp_path):
    train = _mixed_train(tmp_path / "mixed_train.jsonl")
    queries = write_jsonl(tmp_path / "queries.jsonl", QUERIES)
    config = make_config(
        tiny_models["gpt2"],
        train,
        projection={"dim": 4},
        curvature={"strategy": "ekfac", "fisher": "empirical"},
        exact={"factors": True},
    ).with_method(MethodConfig(name="if", damping=None))
    theirs = _kronfluence_scores(config, str(queries), tmp_path)
    run_index(config, show_progress=False)
    ours = run_exact(config, str(queries), QueryOptions(k=3)).scores
    assert ours.shape == theirs.shape and np.abs(theirs).max() > 0
    pearson = float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1])
    relative = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
    assert pearson >= 0.9999, pearson
    assert relative <= 1e-6, relative
