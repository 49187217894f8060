"""The query side of an exact score: each query's full-width gradient preconditioned with the full-width factors
(q' = Q_S F(Λ) ⊙ (Q_Sᵀ G_q Q_A) Q_Aᵀ per module), kept whole or as its top r singular directions
(`exact.query_rank`, as kronfluence's query_gradient_low_rank)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.curvature.factors import ModuleFactors, rotate, unrotate
from engine.errors import TributaryError
from engine.projection import ProjectionSpec
from engine.spectral.core import module_view
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
    """`grads` (Q, D) full-width query gradients → the preconditioned query side of `method`, module by module in
    the gradients' own precision (float32 unless they are float64), as kronfluence preconditions, each module's
    result written over its own gradients: the whole-width float64 copies this replaced held about four times the
    gradients' memory (3.4 GiB against kronfluence's 1.1 on issue 13's workload), and float64 rotations take about
    twice as long, for no more accuracy than float32 rows carry. `grads` is consumed: the preconditioned queries
    are views of its buffer."""
    check_query_rank(rank, spec)
    dtype = np.float64 if grads.dtype == np.float64 else np.float32
    buffer = np.asarray(grads, dtype=dtype)
    if not buffer.flags.writeable:  # gradients a ZeRO-3 group returned through Ray's object store
        buffer = buffer.copy()
    scale = _normalising_scale(buffer) if method.normalise else None
    whole, low_rank = {}, {}
    for module in spec.modules:
        target = module_view(buffer, spec, module.name)
        module_factors = None if factors is None else factors.get(module.name)
        target[...] = _preconditioned_module(target, method, module_factors, scale, dtype)
        if rank is None:
            whole[module.name] = target
            continue
        left, values, right = np.linalg.svd(target, full_matrices=False)
        left = left[:, :, :rank] * values[:, None, :rank]
        right = right[:, :rank, :]
        low_rank[module.name] = (left, right)
        whole[module.name] = left @ right
    return ExactQueries(spec, method.normalise, whole, low_rank)


def _normalising_scale(grads: np.ndarray) -> np.ndarray:
    """1/‖g_q‖ per query over every module (Grad-Cos), 1 for a zero gradient, accumulated in float64."""
    norms = np.sqrt(np.einsum("qd,qd->q", grads, grads, dtype=np.float64))
    return 1.0 / np.where(norms > 0, norms, 1.0)


def _preconditioned_module(
    gradients: np.ndarray,
    method: Method,
    factors: ModuleFactors | None,
    scale: np.ndarray | None,
    dtype: type[np.floating],
) -> np.ndarray:
    """One module's (Q, d_out, d_in) query side: Q_S (F(Λ) ⊙ (Q_Sᵀ G Q_A)) Q_Aᵀ as torch matmuls (numpy's stacked
    matmul took about five times as long at full width on the 2-core machine)."""
    matrices = torch.from_numpy(np.ascontiguousarray(gradients, dtype=dtype))
    if scale is not None:
        matrices *= torch.from_numpy(scale.astype(dtype))[:, None, None]
    if method.spectral is None:
        return matrices.numpy()
    if factors is None:
        raise ValueError(f"method {method.name} needs curvature factors")
    if not factors.rotated or factors.dense:  # no Kronecker rotation to speed up: as the store does it
        blocks = matrices.numpy().astype(np.float64)
        rotated = rotate(blocks, factors) * method.spectral(factors.lam)
        return unrotate(rotated, factors, blocks.shape[1:]).astype(dtype)

    def tensor(values: np.ndarray | None) -> torch.Tensor:
        return torch.from_numpy(np.asarray(values, dtype=dtype))

    q_s, q_a = tensor(factors.q_s), tensor(factors.q_a)
    weights = tensor(method.spectral(factors.lam))
    return (q_s @ (((q_s.T @ matrices) @ q_a) * weights) @ q_a.T).numpy()
