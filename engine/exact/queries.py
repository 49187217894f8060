"""The query side of an exact score: each query's full-width gradient preconditioned with the full-width factors
(q' = Q_S F(Λ) ⊙ (Q_Sᵀ G_q Q_A) Q_Aᵀ per module), kept whole or as its top r singular directions
(`exact.query_rank`, as kronfluence's query_gradient_low_rank)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.curvature.factors import ModuleFactors
from engine.errors import TributaryError
from engine.projection import ProjectionSpec
from engine.spectral.core import module_view, normalise_rows, transform_queries
from engine.spectral.methods import Method


def full_rank(spec: ProjectionSpec) -> dict[str, int]:
    return {m.name: min(m.k_in, m.k_out) for m in spec.modules}


def check_query_rank(rank: int | None, spec: ProjectionSpec) -> None:
    """A rank above a module's full rank is refused, naming the module and its full rank."""
    if rank is None:
        return
    ranks = full_rank(spec)
    above = [name for name, full in ranks.items() if rank > full]
    if above:
        lowest = min(ranks.values())
        raise TributaryError(
            f"exact.query_rank {rank} is above the full rank of module {above[0]} ({ranks[above[0]]} = "
            f"min(d_out, d_in)); set exact.query_rank to at most {lowest}, or null for full rank"
        )


@dataclass
class ExactQueries:
    """What a scoring worker needs: per module the preconditioned queries (Q, d_out, d_in), and with a rank r
    their factors left (Q, d_out, r) (singular values folded in) and right (Q, r, d_in); `whole` is then their
    product, so that either way of scoring a row gives the same number. `rows`: the training rows to score
    (sorted), None for every row."""

    spec: ProjectionSpec
    normalise: bool
    whole: dict[str, np.ndarray]
    low_rank: dict[str, tuple[np.ndarray, np.ndarray]]
    rows: np.ndarray | None = None

    @property
    def count(self) -> int:
        return next(iter(self.whole.values())).shape[0]

    def restricted(self, rows: np.ndarray | None) -> ExactQueries:
        return ExactQueries(self.spec, self.normalise, self.whole, self.low_rank, rows)


def exact_queries(
    grads: np.ndarray,
    spec: ProjectionSpec,
    method: Method,
    factors: dict[str, ModuleFactors] | None,
    rank: int | None,
) -> ExactQueries:
    """`grads` (Q, D) full-width query gradients → the preconditioned query side of `method`."""
    check_query_rank(rank, spec)
    transformed = _preconditioned(grads, spec, method, factors)
    whole, low_rank = {}, {}
    for module in spec.modules:
        matrices = module_view(transformed, spec, module.name)
        if rank is None:
            whole[module.name] = np.ascontiguousarray(matrices)
            continue
        left, values, right = np.linalg.svd(matrices, full_matrices=False)
        left = left[:, :, :rank] * values[:, None, :rank]
        right = right[:, :rank, :]
        low_rank[module.name] = (left, right)
        whole[module.name] = left @ right
    return ExactQueries(spec, method.normalise, whole, low_rank)


def _preconditioned(
    grads: np.ndarray, spec: ProjectionSpec, method: Method, factors: dict[str, ModuleFactors] | None
) -> np.ndarray:
    """transform_queries's float64 arithmetic, Q_S (F(Λ) ⊙ (Q_Sᵀ G Q_A)) Q_Aᵀ per module, with the rotations as
    torch matmuls: numpy's stacked float64 matmul took about five times as long at full width on the 2-core
    machine, and it ran once per query batch (about 40% of a small batch's time in its profile)."""
    eigenbases = factors is not None and all(
        factors[m.name].rotated and not factors[m.name].dense for m in spec.modules
    )
    if method.spectral is None or factors is None or not eigenbases:
        return transform_queries(grads, spec, method, factors)  # no Kronecker rotation to speed up
    rows = np.asarray(grads, dtype=np.float64)
    if method.normalise:
        rows = normalise_rows(rows)
    out = np.empty_like(rows)
    for module in spec.modules:
        module_factors = factors[module.name]
        q_s = torch.from_numpy(np.asarray(module_factors.q_s, dtype=np.float64))
        q_a = torch.from_numpy(np.asarray(module_factors.q_a, dtype=np.float64))
        weights = torch.from_numpy(np.asarray(method.spectral(module_factors.lam), dtype=np.float64))
        matrices = torch.from_numpy(np.ascontiguousarray(module_view(rows, spec, module.name)))
        result = q_s @ (((q_s.T @ matrices) @ q_a) * weights) @ q_a.T
        out[:, module.offset : module.offset + module.width] = result.reshape(len(rows), -1).numpy()
    return out
