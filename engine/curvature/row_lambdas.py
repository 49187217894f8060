"""Λ sums from stored rows: Σ_n (Q_Sᵀ G̃_n Q_A)² of flattened projected gradients (n, D), as read from a store.

The rows are the same G̃_n a second model pass would compute (the data-label rows with `fisher: empirical`,
the sampled-label `fisher_grads` with the true Fisher), so Λ costs one read of the store instead of a forward
and backward per example. Rows are added in blocks so the float64 temporaries stay small.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.curvature.accumulators import LambdaAccumulator
from engine.curvature.factors import ModuleFactors
from engine.curvature.statistics import ModuleLambda
from engine.projection import ProjectionSpec

BLOCK_ROWS = 256


def module_gradients(rows: np.ndarray, spec: ProjectionSpec) -> dict[str, torch.Tensor]:
    """Each module's (n, k_out, k_in) view of flattened rows (n, D) in the store's layout."""
    flat = torch.from_numpy(np.ascontiguousarray(rows))
    return {m.name: flat[:, m.offset : m.offset + m.width].reshape(-1, m.k_out, m.k_in) for m in spec.modules}


def row_lambda_sums(
    rows: np.ndarray,
    spec: ProjectionSpec,
    factors: dict[str, ModuleFactors],
    scale: dict[str, np.ndarray] | None = None,
    device: torch.device = torch.device("cpu"),
) -> dict[str, ModuleLambda]:
    """Σ over `rows` of (Q_Sᵀ (s ⊙ G̃_n) Q_A)² per module (`add_lambda`), and their count."""
    lambdas = LambdaAccumulator(spec, factors, scale, device)
    for start in range(0, len(rows), BLOCK_ROWS):
        block = module_gradients(rows[start : start + BLOCK_ROWS], spec)
        lambdas.add({name: grads.to(device) for name, grads in block.items()})
    return lambdas.sums
