"""Tributary's EK-FAC influence scores equal kronfluence's EK-FAC pairwise scores (an independent library).

Setting: identity projection (projection.dim 0), curvature.strategy ekfac, curvature.fisher empirical,
method if with one numeric damping, tiny GPT-2 / Llama models in float64, the same tokenized rows
(text rows and prompt/completion rows mixed, so padding and prompt masking are both exercised).

**The constant factor is exactly 1** (score_tributary = 1 × score_kronfluence): both compute

    score(q, i) = Σ_m ⟨ Q_S [ (Q_Sᵀ G_q Q_A) / (Λ + damping) ] Q_Aᵀ , G_i ⟩,   Λ = (1/N) Σ_n (Q_Sᵀ G_n Q_A)²,

with G the gradient of the token-*summed* loss of one example, the bias as a constant-1 input
column, and no 1/N on the score. Where the two sides are written differently it does not change
the result:

- kronfluence normalises both covariances by the number of unmasked tokens
  (`perform_eigendecomposition` divides by NUM_*_COVARIANCE_PROCESSED); Tributary divides Ã by
  tokens but S̃ by examples (engine/curvature/factors.py). This rescales S̃'s eigenvalues only;
  EK-FAC uses only the eigenvectors Q_S, Q_A, so Λ and the scores are unaffected.
- Λ: kronfluence divides its summed squares by NUM_LAMBDA_PROCESSED (examples) in `Ekfac.prepare`
  and adds `damping_factor` after that, i.e. 1/(Λ_sum/N + damping) — Tributary's 1/(Λ + damping)
  with Λ the mean over examples (engine/curvature/factors.py `correct`, engine/spectral/methods.py).
- Eigenvector signs differ freely between the two eigh calls but cancel (Q appears twice per side).
- kronfluence masks padding only in the covariance pass; elsewhere padded positions have zero
  output-gradient (right padding, causal attention, label -100), so they contribute nothing.
- kronfluence wraps only nn.Linear, so for GPT-2 its copy of the model has each tracked HF Conv1D
  replaced by the equivalent nn.Linear (weight transposed, same bias, same module name).

(For K-FAC the factor would not be 1: there Λ = σ αᵀ uses S̃'s eigenvalues, and Tributary's S̃ is
r = tokens/examples times kronfluence's, so Tributary's K-FAC score with damping d equals
(1/r) × kronfluence's K-FAC score with damping d/r. EK-FAC, tested here, has no such factor.)

The damping is a number, 1e-3 × the mean of kronfluence's Λ over all modules, passed to both sides.
The heuristic damping (None: 0.1 × mean Λ per module, in both libraries) is checked as well.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.kronfluence_side import RowDataset, causal_lm_task, conv1d_to_linear
from engine.config import MethodConfig
from engine.data.rows import field_names, read_rows
from engine.gradients.context import prepare_index_job
from engine.local_or_ray import run_index, run_query
from engine.model.loading import load_model
from engine.store import GradientStore
from tests.conftest import PROMPTS, SENTENCES, write_jsonl

kronfluence = pytest.importorskip("kronfluence")
from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.utils.dataset import DataLoaderKwargs  # noqa: E402

QUERIES = [
    {"id": "q0", "text": "the fox eats clams in the snow"},
    {"id": "q1", "prompt": "the owl eats", "completion": " fish at night"},
    {"id": "q2", "text": "a wolf eats honey in the cold forest"},
]


def _mixed_train(path: Path) -> Path:
    rows = [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)]
    rows += [{"id": f"p{i}", "prompt": p, "completion": " " + c} for i, (p, c) in enumerate(PROMPTS)]
    return write_jsonl(path, rows)


def _compare(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    pearson = float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1])
    relative = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
    return pearson, relative


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_ekfac_influence_matches_kronfluence(kind, tiny_models, make_config, tmp_path):
    train = _mixed_train(tmp_path / "mixed_train.jsonl")
    queries = write_jsonl(tmp_path / "queries.jsonl", QUERIES)
    config = make_config(
        tiny_models[kind], train, curvature={"strategy": "ekfac", "fisher": "empirical"}, method={"name": "if"}
    )
    assert config.projection.dim == 0 and config.model.dtype == "float64" and config.model.include_bias

    # --- kronfluence, on its own copy of the same model and the same tokenized rows ---
    job = prepare_index_job(config)
    module_names = list(job.context.modules)
    query_rows = job.context.tokenize(read_rows(queries, field_names(config)), str(queries))
    model, _ = load_model(config.model, torch.device("cpu"))
    conv1d_to_linear(model, module_names)
    task = causal_lm_task(module_names, true_fisher=False)
    model = prepare_model(model, task)
    analyzer = Analyzer(
        analysis_name="tributary",
        model=model,
        task=task,
        cpu=True,
        disable_tqdm=True,
        output_dir=str(tmp_path / "kronfluence"),
        disable_model_save=True,
    )
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
    train_set = RowDataset(job.tokenized, job.context.pad_id)
    query_set = RowDataset(query_rows, job.context.pad_id)
    f64 = torch.float64
    factor_args = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=True,
        activation_covariance_dtype=f64,
        gradient_covariance_dtype=f64,
        eigendecomposition_dtype=f64,
        per_sample_gradient_dtype=f64,
        lambda_dtype=f64,
    )
    analyzer.fit_all_factors(
        "ekfac", dataset=train_set, per_device_batch_size=5, factor_args=factor_args, overwrite_output_dir=True
    )
    lambdas = analyzer.load_lambda_matrices("ekfac")
    assert lambdas is not None, "kronfluence saved no lambda matrices"
    their_lambda = {
        name: (lambdas["lambda_matrix"][name] / lambdas["num_lambda_processed"][name]).numpy() for name in module_names
    }
    damping = 1e-3 * float(np.mean(np.concatenate([lam.ravel() for lam in their_lambda.values()])))

    def kronfluence_scores(name: str, damping_factor: float | None) -> np.ndarray:
        score_args = ScoreArguments(
            damping_factor=damping_factor, per_sample_gradient_dtype=f64, precondition_dtype=f64, score_dtype=f64
        )
        analyzer.compute_pairwise_scores(
            name,
            "ekfac",
            query_dataset=query_set,
            train_dataset=train_set,
            per_device_query_batch_size=2,
            per_device_train_batch_size=4,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores(name)
        assert scores is not None, f"kronfluence saved no scores for {name}"
        return scores["all_modules"].to(f64).numpy()

    # --- Tributary ---
    run_index(config, show_progress=False)
    factors = GradientStore.open(config.store.path).read_factors()
    assert list(factors) == module_names
    for name in module_names:  # diagnostic: corrected eigenvalues agree before any score is compared
        ours_lam = factors[name].lam
        assert ours_lam.shape == their_lambda[name].shape
        assert np.linalg.norm(ours_lam - their_lambda[name]) <= 1e-6 * np.linalg.norm(their_lambda[name]), name

    for label, damping_value in [("numeric", damping), ("heuristic", None)]:
        theirs = kronfluence_scores(f"pairwise_{label}", damping_value)
        ours = run_query(config.with_method(MethodConfig(name="if", damping=damping_value)), str(queries), k=3).total
        assert ours is not None
        assert ours.shape == theirs.shape == (len(QUERIES), len(job.tokenized))
        assert np.abs(theirs).max() > 0
        factor = 1.0  # see the module docstring
        pearson, relative = _compare(ours, factor * theirs)
        assert pearson >= 0.9999, (label, pearson)
        assert relative <= 1e-6, (label, relative)
