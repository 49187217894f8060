"""Curvature factors per module: eigenbases Q_A, Q_S and the eigenvalue grid Λ (k_out x k_in).

Normalisation. Ã = Σ_tokens ã ãᵀ / #tokens and S̃ = Σ_tokens δ̃ δ̃ᵀ / #examples, so that K-FAC's
σ αᵀ estimates the Fisher of a per-example (token-summed) loss: E_n[vec G̃ vec G̃ᵀ] ≈ S̃ ⊗ Ã when
tokens are independent. EK-FAC's Λ = E_n[(Q_Sᵀ G̃_n Q_A)²] is a mean over examples, as in kronfluence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.curvature.statistics import ModuleCovariance, ModuleLambda
from engine.errors import TributaryError

DENSE = "dense"  # a full eigendecomposition of one module's projected gradient covariance (TRAK-style)
NEEDS_COVARIANCE = {"kfac", "ekfac"}
NEEDS_LAMBDA_PASS = {"diagonal", "ekfac"}


@dataclass
class ModuleFactors:
    """Λ in the basis given by (q_s, q_a); a basis of None means the raw projected basis (identity)."""

    strategy: str
    lam: np.ndarray  # (k_out, k_in) float64
    q_a: np.ndarray | None = None  # (k_in, k_in)
    q_s: np.ndarray | None = None  # (k_out, k_out)
    alpha: np.ndarray | None = None
    sigma: np.ndarray | None = None
    basis: np.ndarray | None = None  # dense: (k, k) eigenvectors of the vectorised gradient covariance; lam (k,)

    @property
    def rotated(self) -> bool:
        return self.q_a is not None

    @property
    def dense(self) -> bool:
        return self.basis is not None


def _eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh(0.5 * (matrix + matrix.T))
    return np.clip(values, 0.0, None), vectors


def eigendecompose(covariance: ModuleCovariance, strategy: str) -> ModuleFactors:
    """The K-FAC eigenbasis (float64) and, for K-FAC, Λ = σ αᵀ; EK-FAC's Λ comes from `correct`."""
    if covariance.examples == 0:
        raise ValueError("covariance has no data")
    # a routed expert no token of the fit reached has A = 0 (so Λ = 0: damping alone); its gradient is then zero
    # on every row the curvature was fitted on
    a_mean = covariance.a_sum / covariance.tokens if covariance.tokens else np.zeros_like(covariance.a_sum)
    alpha, q_a = _eigh(a_mean)
    sigma, q_s = _eigh(covariance.s_sum / covariance.examples)
    lam = np.outer(sigma, alpha)
    return ModuleFactors(strategy=strategy, lam=lam, q_a=q_a, q_s=q_s, alpha=alpha, sigma=sigma)


def correct(factors: ModuleFactors, lambdas: ModuleLambda) -> ModuleFactors:
    """Replace Λ by the mean of squared per-example gradients in the factors' basis."""
    if lambdas.examples == 0:
        raise ValueError("eigenvalue-correction sums have no data")
    return ModuleFactors(
        strategy=factors.strategy,
        lam=lambdas.sum / lambdas.examples,
        q_a=factors.q_a,
        q_s=factors.q_s,
        alpha=factors.alpha,
        sigma=factors.sigma,
    )


def identity_factors(k_in: int, k_out: int) -> ModuleFactors:
    return ModuleFactors(strategy="identity", lam=np.ones((k_out, k_in)))


def diagonal_factors(lambdas: ModuleLambda) -> ModuleFactors:
    return ModuleFactors(strategy="diagonal", lam=lambdas.sum / lambdas.examples)


def rotate(grads: np.ndarray, factors: ModuleFactors) -> np.ndarray:
    """ĝ = Q_Sᵀ G̃ Q_A for a stack of gradients (..., k_out, k_in); unchanged in the raw basis.

    Dense factors rotate the row-major vectorised gradient instead: ĝ = Bᵀ vec(G̃), shape (..., k)."""
    if factors.basis is not None:  # dense
        return grads.reshape(*grads.shape[:-2], -1) @ factors.basis
    if factors.q_a is None:  # not rotated
        return grads
    return _q_s(factors).T @ grads @ factors.q_a


def unrotate(grads: np.ndarray, factors: ModuleFactors, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The inverse of `rotate`; dense factors need the module's (k_out, k_in) `shape` back."""
    if factors.basis is not None:  # dense
        if shape is None:
            raise ValueError("unrotating dense factors needs the module's (k_out, k_in) shape")
        return (grads @ factors.basis.T).reshape(*grads.shape[:-1], *shape)
    if factors.q_a is None:  # not rotated
        return grads
    return _q_s(factors) @ grads @ factors.q_a.T


def _q_s(factors: ModuleFactors) -> np.ndarray:
    if factors.q_s is None:
        raise ValueError(f"{factors.strategy} factors have a Q_A basis but no Q_S")
    return factors.q_s


def dense_factors(gram: np.ndarray) -> ModuleFactors:
    """Eigendecomposition (float64) of one module's Σ_i vec(G̃_i) vec(G̃_i)ᵀ: TRAK's ΦᵀΦ."""
    lam, basis = _eigh(gram)
    return ModuleFactors(strategy=DENSE, lam=lam, basis=basis)


def _require_finite(covariance: dict[str, ModuleCovariance], names) -> None:
    """eigh of a non-finite matrix fails (or returns NaN): name the modules instead."""
    bad = [n for n in names if not (np.isfinite(covariance[n].a_sum).all() and np.isfinite(covariance[n].s_sum).all())]
    if bad:
        raise TributaryError(
            f"the covariance sums of {', '.join(bad)} are not finite (NaN/inf), so no eigenbasis exists; the "
            "model overflows or holds NaN weights: check model.path and model.dtype, then index with --overwrite"
        )


def initial_factors(
    strategy: str, covariance: dict[str, ModuleCovariance], widths: dict[str, tuple[int, int]]
) -> dict[str, ModuleFactors]:
    """Factors after pass 1: eigenbases (K-FAC/EK-FAC) or placeholders; `widths` maps name → (k_in, k_out)."""
    if strategy in NEEDS_COVARIANCE:
        _require_finite(covariance, widths)
        return {name: eigendecompose(covariance[name], strategy) for name in widths}
    return {name: identity_factors(k_in, k_out) for name, (k_in, k_out) in widths.items()}


def final_factors(
    strategy: str, initial: dict[str, ModuleFactors], lambdas: dict[str, ModuleLambda]
) -> dict[str, ModuleFactors]:
    bad = [name for name in initial if name in lambdas and not np.isfinite(lambdas[name].sum).all()]
    if strategy in ("ekfac", "diagonal") and bad:
        raise TributaryError(
            f"the eigenvalue-correction sums of {', '.join(bad)} are not finite (NaN/inf); the model overflows or "
            "holds NaN weights: check model.path and model.dtype, then index with --overwrite"
        )
    if strategy == "ekfac":
        return {name: correct(factors, lambdas[name]) for name, factors in initial.items()}
    if strategy == "diagonal":
        return {name: diagonal_factors(lambdas[name]) for name in initial}
    return initial
