"""TracInCP, TRAK-style and DataInf against their explicit formulas, on a 2-layer MLP.

The methods run through the engine's own code (in-memory capture → engine.curvature → engine.spectral);
the references are written out here from per-example gradients taken independently with torch.func
(vmap of grad), then plain numpy loops and solves.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.attribution import Checkpoint, Dataset, InMemoryAttribution, Segment, Settings, TrainingRun, squared_error
from engine.config import OptimizerConfig, ProjectionConfig
from tests.unrolling import mlp, module_widths, per_example_gradients, sgd, split_modules, train

N, Q = 12, 3


@pytest.fixture(scope="module")
def setting():
    """A 3-16-1 tanh MLP trained 30 SGD steps; checkpoints at steps 10, 20, 30 (lr 0.3, 0.2, 0.1)."""
    model = mlp(3, 16, seed=0)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(N + Q, 3, generator=generator, dtype=torch.float64)
    targets = torch.sin(inputs.sum(dim=1, keepdim=True)) + 0.1 * torch.randn(
        N + Q, 1, generator=generator, dtype=torch.float64
    )
    start = {name: p.detach() for name, p in model.named_parameters()}
    rates = [0.3] * 10 + [0.2] * 10 + [0.1] * 10
    _, checkpoints = train(model, start, [(inputs[:N], targets[:N], 30)], sgd(rates), [None], every=10)
    return model, Dataset(inputs[:N], targets[:N]), Dataset(inputs[N:], targets[N:]), checkpoints, [0.3, 0.2, 0.1]


def _grads(model, params, data: Dataset, dim: int = 0) -> np.ndarray:
    return per_example_gradients(model, params, data.inputs, data.targets, dim=dim)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_tracin_equals_loop_over_checkpoints(setting, momentum):
    """TracInCP = Σ_c η_c ⟨g_q^c, g_i^c⟩ with η_c the learning rate at checkpoint c (÷ (1 − β) with momentum)."""
    model, train_data, queries, checkpoints, rates = setting
    run = TrainingRun(
        [
            Segment([Checkpoint(c, learning_rate=r) for c, r in zip(checkpoints[:2], rates[:2])], train_data),
            Segment([Checkpoint(checkpoints[2], learning_rate=rates[2])], train_data),
        ],
        optimizer=OptimizerConfig(momentum=momentum),
    )
    scores = InMemoryAttribution(model, squared_error(), run).scores("tracin", queries)
    expected = np.zeros((Q, N))
    for params, rate in zip(checkpoints, rates):
        expected += rate / (1 - momentum) * _grads(model, params, queries) @ _grads(model, params, train_data).T
    np.testing.assert_allclose(scores, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dim,damping", [(0, 0.05), (0, None), (4, 0.05)])
def test_trak_equals_explicit_damped_gauss_newton_inverse(setting, dim, damping):
    """TRAK-style: per module g_qᵀ (ΦᵀΦ + λI)⁻¹ g_i with Φ the (projected) training gradients; averaged over
    two checkpoints (the ensemble). Default λ = 0.1 × mean eigenvalue = 0.1 · trace(ΦᵀΦ) / k per module."""
    model, train_data, queries, checkpoints, _ = setting
    ensemble = checkpoints[1:]
    run = TrainingRun([Segment([Checkpoint(c) for c in ensemble], train_data)])
    settings = Settings(projection=ProjectionConfig(dim=dim))
    scores = InMemoryAttribution(model, squared_error(), run, settings).scores("trak", queries, damping=damping)
    widths = module_widths(model, dim)
    expected = np.zeros((Q, N))
    for params in ensemble:
        train_parts = split_modules(_grads(model, params, train_data, dim), widths)
        query_parts = split_modules(_grads(model, params, queries, dim), widths)
        for phi, g_q in zip(train_parts, query_parts):
            gram = phi.T @ phi
            lam = 0.1 * np.trace(gram) / len(gram) if damping is None else damping
            expected += g_q @ np.linalg.solve(gram + lam * np.eye(len(gram)), phi.T) / len(ensemble)
    np.testing.assert_allclose(scores, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("damping", [0.3, None])
def test_datainf_equals_its_formula(setting, damping):
    """DataInf per layer l (FiMO's code): (1/λ_l)[vᵀg_k − (1/n) Σ_i (vᵀg_i)(g_iᵀg_k)/(λ_l + ‖g_i‖²)], summed over
    layers, with λ_l = 0.1 · mean_i ‖g_il‖² / d_l by default; also equal to the average of the explicit
    inverses (1/n) Σ_i (g_i g_iᵀ + λ_l I)⁻¹ (Sherman-Morrison)."""
    model, train_data, queries, checkpoints, _ = setting
    final = checkpoints[-1]
    scores = InMemoryAttribution(model, squared_error(), TrainingRun.final_only(final, train_data)).scores(
        "datainf", queries, damping=damping
    )
    widths = module_widths(model)
    train_parts = split_modules(_grads(model, final, train_data), widths)
    query_parts = split_modules(_grads(model, final, queries), widths)
    loops = np.zeros((Q, N))
    inverses = np.zeros((Q, N))
    for g, v in zip(train_parts, query_parts):
        lam = 0.1 * np.mean(np.sum(g**2, axis=1)) / g.shape[1] if damping is None else damping
        for q in range(Q):
            for k in range(N):
                correction = sum((v[q] @ g[i]) * (g[i] @ g[k]) / (lam + g[i] @ g[i]) for i in range(N)) / N
                loops[q, k] += (v[q] @ g[k] - correction) / lam
        average_inverse = sum(np.linalg.inv(np.outer(g[i], g[i]) + lam * np.eye(g.shape[1])) for i in range(N)) / N
        inverses += v @ average_inverse @ g.T
    np.testing.assert_allclose(scores, loops, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(scores, inverses, rtol=1e-7, atol=1e-8)


def test_grad_dot_and_engine_gradients_equal_autograd(setting):
    """The in-memory capture's rows (dim 0 and dim 4) equal torch.func's per-example gradients."""
    model, train_data, queries, checkpoints, _ = setting
    for dim in (0, 4):
        attribution = InMemoryAttribution(
            model,
            squared_error(),
            TrainingRun.final_only(checkpoints[-1], train_data),
            Settings(projection=ProjectionConfig(dim=dim)),
        )
        np.testing.assert_allclose(
            attribution.gradients("c0"), _grads(model, checkpoints[-1], train_data, dim), rtol=1e-12, atol=1e-14
        )
        expected = _grads(model, checkpoints[-1], queries, dim) @ _grads(model, checkpoints[-1], train_data, dim).T
        np.testing.assert_allclose(attribution.scores("grad_dot", queries), expected, rtol=1e-10, atol=1e-12)
