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

import numpy as np
import pytest

from engine.config import MethodConfig
from engine.local_or_ray import run_index, run_query
from engine.store import GradientStore
from tests.conftest import write_jsonl
from tests.reference import KRONFLUENCE_QUERIES, KronfluenceEkfac, mixed_train
from tests.requirements import require

kronfluence = require("kronfluence")


def _compare(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    pearson = float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1])
    relative = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
    return pearson, relative


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_ekfac_influence_matches_kronfluence(kind, tiny_models, make_config, tmp_path):
    train = mixed_train(tmp_path / "mixed_train.jsonl")
    queries = write_jsonl(tmp_path / "queries.jsonl", KRONFLUENCE_QUERIES)
    config = make_config(
        tiny_models[kind], train, curvature={"strategy": "ekfac", "fisher": "empirical"}, method={"name": "if"}
    )
    assert config.projection.dim == 0 and config.model.dtype == "float64" and config.model.include_bias

    # --- kronfluence, on its own copy of the same model and the same tokenized rows ---
    theirs_ekfac = KronfluenceEkfac.fit(config, tmp_path / "kronfluence")
    module_names = theirs_ekfac.module_names
    their_lambda = theirs_ekfac.lambdas()
    damping = 1e-3 * float(np.mean(np.concatenate([lam.ravel() for lam in their_lambda.values()])))

    # --- Tributary ---
    run_index(config, show_progress=False)
    factors = GradientStore.open(config.store.path).read_factors()
    assert list(factors) == module_names
    for name in module_names:  # diagnostic: corrected eigenvalues agree before any score is compared
        ours_lam = factors[name].lam
        assert ours_lam.shape == their_lambda[name].shape
        assert np.linalg.norm(ours_lam - their_lambda[name]) <= 1e-6 * np.linalg.norm(their_lambda[name]), name

    for label, damping_value in [("numeric", damping), ("heuristic", None)]:
        theirs = theirs_ekfac.pairwise_scores(queries, damping_value, f"pairwise_{label}")
        ours = run_query(config.with_method(MethodConfig(name="if", damping=damping_value)), str(queries), k=3).total
        assert ours is not None
        assert ours.shape == theirs.shape == (len(KRONFLUENCE_QUERIES), len(theirs_ekfac.job.tokenized))
        assert np.abs(theirs).max() > 0
        factor = 1.0  # see the module docstring
        pearson, relative = _compare(ours, factor * theirs)
        assert pearson >= 0.9999, (label, pearson)
        assert relative <= 1e-6, (label, relative)
