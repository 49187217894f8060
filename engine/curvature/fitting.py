"""From curvature sums to factors, the one way both the store's driver and in-memory attribution take.

Pass 1's covariance sums of every part (a checkpoint's rows; several for a segment) are added and
eigendecomposed once; pass 2's Λ sums of every part, taken in that shared basis (of P^{1/2}-scaled
gradients when a preconditioner scale is given), are added and correct the eigenvalues — Source App. D.
One part is the plain single-checkpoint case.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import numpy as np

from engine.curvature.factors import NEEDS_COVARIANCE, NEEDS_LAMBDA_PASS, ModuleFactors, final_factors, initial_factors
from engine.curvature.statistics import ModuleCovariance, ModuleLambda, PartialSums, merge_all
from engine.errors import TributaryError
from engine.projection import ProjectionSpec

Factors = dict[str, ModuleFactors]
Scale = dict[str, np.ndarray]
Widths = dict[str, tuple[int, int]]  # module name → (k_in, k_out)
Part = TypeVar("Part")


def module_widths(spec: ProjectionSpec) -> Widths:
    return {m.name: (m.k_in, m.k_out) for m in spec.modules}


def shared_basis(strategy: str, widths: Widths, covariances: Iterable[dict[str, ModuleCovariance]]) -> Factors:
    """Pass-1 factors: the parts' covariance sums added and eigendecomposed (K-FAC, EK-FAC), placeholders
    otherwise. `covariances` is only iterated when the strategy needs them, so a generator defers the reads."""
    covariance = {}
    if strategy in NEEDS_COVARIANCE:
        covariance = merge_all([PartialSums(covariance=sums) for sums in covariances]).covariance
    return initial_factors(strategy, covariance, widths)


def corrected_factors(strategy: str, basis: Factors, lambdas: Iterable[dict[str, ModuleLambda]]) -> Factors:
    """The final factors: Λ from the parts' eigenvalue-correction sums, added (EK-FAC, diagonal)."""
    return final_factors(strategy, basis, merge_all([PartialSums(lambdas=sums) for sums in lambdas]).lambdas)


def fit_factors(
    strategy: str,
    widths: Widths,
    parts: Sequence[Part],
    covariance: Callable[[Part], dict[str, ModuleCovariance]],
    lambdas: Callable[[Part, Factors, Scale | None], dict[str, ModuleLambda]],
    scale: Scale | None = None,
) -> Factors:
    """Factors shared by `parts`: `covariance(part)` gives a part's pass-1 sums, `lambdas(part, basis, scale)`
    its Λ sums in `basis` of gradients scaled elementwise by `scale` (Adam's P^{1/2}, for the factors of
    P^{1/2} H P^{1/2}; None: unscaled)."""
    if scale is not None and strategy not in NEEDS_LAMBDA_PASS:
        raise TributaryError(
            f"the preconditioned (Adam) variant needs curvature strategy ekfac or diagonal (Λ of P^1/2 H P^1/2 "
            f"comes from the eigenvalue-correction pass), not {strategy}"
        )
    basis = shared_basis(strategy, widths, (covariance(part) for part in parts))
    if strategy not in NEEDS_LAMBDA_PASS:
        return basis
    return corrected_factors(strategy, basis, [lambdas(part, basis, scale) for part in parts])
