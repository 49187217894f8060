"""The methods, each a spectral function F(Λ) and what it needs. The math of every method is here.

score(q, i) = Σ_m ⟨F(Λ_m) ⊙ ĝ_{q,m}, ĝ_{i,m}⟩ with ĝ = Q_Sᵀ G̃ Q_A. Scores are *not* divided by N
(as in kronfluence): for influence and Source the predicted change of the query loss when example i
is removed from N training examples is score / N. Positive = the example supports the query.
EK-FAC influence scores equal kronfluence's exactly (tests/test_kronfluence.py). For K-FAC,
Λ = σ αᵀ with S̃ normalised per example (kronfluence: per token), so with r = tokens/examples
Tributary's K-FAC score at damping d = (1/r) × kronfluence's at damping d/r.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from engine.config import MethodConfig

SpectralFunction = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Method:
    name: str
    needs_curvature: bool
    normalise: bool  # unit-normalise both sides over all modules (Grad-Cos)
    spectral: Callable[[np.ndarray], np.ndarray] | None  # None: F = 1, no rotation needed


def default_damping(lam: np.ndarray) -> float:
    """0.1 x the mean eigenvalue of the module (kronfluence's heuristic)."""
    return 0.1 * float(np.mean(lam))


def influence_function(damping: float | None) -> SpectralFunction:
    def apply(lam: np.ndarray) -> np.ndarray:
        d = default_damping(lam) if damping is None else damping
        return 1.0 / (lam + d)
    return apply


def _with_limit_at_zero(lam: np.ndarray, limit: float, positive: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    lam = np.asarray(lam, dtype=np.float64)
    out = np.full(lam.shape, limit)
    where = lam > 0
    out[where] = positive(lam[where]) / lam[where]
    return out


def source_exponential(eta: float, steps: int) -> SpectralFunction:
    """(1 − e^{−ηKλ})/λ, which tends to ηK as λ → 0 (computed with expm1, exact at λ = 0)."""
    horizon = eta * steps
    return lambda lam: _with_limit_at_zero(lam, horizon, lambda x: -np.expm1(-horizon * x))


def source_discrete(eta: float, steps: int) -> SpectralFunction:
    """(1 − (1 − ηλ)^K)/λ: exactly K gradient-descent steps of size η on the quadratic surrogate."""
    def numerator(lam: np.ndarray) -> np.ndarray:
        step = eta * lam
        out = np.empty_like(step)
        stable = step < 1.0
        out[stable] = -np.expm1(steps * np.log1p(-step[stable]))
        out[~stable] = 1.0 - np.power(1.0 - step[~stable], steps)
        return out
    return lambda lam: _with_limit_at_zero(lam, eta * steps, numerator)


def source_transport(eta: float, steps: int) -> SpectralFunction:
    """e^{−ηKλ}: how a segment transports the query side (multi-segment Source)."""
    return lambda lam: np.exp(-eta * steps * np.asarray(lam, dtype=np.float64))


def method_from_config(config: MethodConfig) -> Method:
    if config.name == "grad_dot":
        return Method("grad_dot", needs_curvature=False, normalise=False, spectral=None)
    if config.name == "grad_cos":
        return Method("grad_cos", needs_curvature=False, normalise=True, spectral=None)
    if config.name == "if":
        return Method("if", needs_curvature=True, normalise=False, spectral=influence_function(config.damping))
    if config.name == "source":
        build = source_exponential if config.form == "exponential" else source_discrete
        return Method("source", needs_curvature=True, normalise=False, spectral=build(config.eta, config.steps))
    raise ValueError(f"unknown method {config.name!r}")
