"""The floor benchmark times the computations exact EK-FAC needs: its covariance and both ways to Λ must equal
the engine's own (`add_covariance`, `add_lambda`) and an explicit per-example loop, or the floor would time
something cheaper than the real work."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.ekfac_floor import FloorModule
from engine.curvature.statistics import ModuleCovariance, ModuleLambda, add_covariance, add_lambda


def _module() -> FloorModule:
    return FloorModule("m", 5, 7, torch.Generator().manual_seed(3), batch=3, tokens=4, dtype=torch.float64)


def test_floor_covariance_is_the_engines() -> None:
    m = _module()
    a_sum, s_sum = torch.zeros(5, 5, dtype=torch.float64), torch.zeros(7, 7, dtype=torch.float64)
    m.covariance(a_sum, s_sum)
    engine = ModuleCovariance.zeros(5, 7)
    add_covariance(engine, [m.a], [m.delta], torch.ones(3, 4))
    np.testing.assert_allclose(a_sum.numpy(), engine.a_sum, rtol=1e-12)
    np.testing.assert_allclose(s_sum.numpy(), engine.s_sum, rtol=1e-12)


def test_floor_lambda_both_ways_equal_an_explicit_loop_and_the_engine() -> None:
    m = _module()
    per_token, per_row = torch.zeros(7, 5, dtype=torch.float64), torch.zeros(7, 5, dtype=torch.float64)
    m.lambda_per_token(per_token)
    rows = m.row_gradients()
    m.lambda_per_row(per_row, rows)
    loop = np.zeros((7, 5))
    for n in range(3):
        gradient = sum(np.outer(m.delta[n, t].numpy(), m.a[n, t].numpy()) for t in range(4))
        np.testing.assert_allclose(rows[n].numpy(), gradient, rtol=1e-12)
        loop += (m.q_s.numpy().T @ gradient @ m.q_a.numpy()) ** 2
    engine = ModuleLambda.zeros(5, 7)
    add_lambda(engine, rows, (m.q_s, m.q_a))
    for lam in (per_token.numpy(), per_row.numpy(), engine.sum):
        np.testing.assert_allclose(lam, loop, rtol=1e-10)
