"""Apply a method to query gradients and score them against stored training rows.

Every method only changes the query side: q' = Q_S (F(Λ) ⊙ Q_Sᵀ G̃_q Q_A) Q_Aᵀ, and then
score(q, i) = ⟨q', G̃_i⟩ against the raw stored rows, so one store serves every method.
"""

from __future__ import annotations

import numpy as np

from engine.curvature.factors import ModuleFactors, rotate, unrotate
from engine.projection import ProjectionSpec
from engine.spectral.methods import Method


def module_view(rows: np.ndarray, spec: ProjectionSpec, name: str) -> np.ndarray:
    module = next(m for m in spec.modules if m.name == name)
    block = rows[:, module.offset:module.offset + module.width]
    return block.reshape(rows.shape[0], module.k_out, module.k_in)


def transform_queries(query_rows: np.ndarray, spec: ProjectionSpec, method: Method,
                      factors: dict[str, ModuleFactors] | None) -> np.ndarray:
    """The query side of the score, in the raw projected layout (Q, D), float64."""
    query_rows = np.asarray(query_rows, dtype=np.float64)
    if method.normalise:
        norms = np.linalg.norm(query_rows, axis=1, keepdims=True)
        query_rows = query_rows / np.where(norms > 0, norms, 1.0)
    if method.spectral is None:
        return query_rows
    if factors is None:
        raise ValueError(f"method {method.name} needs curvature factors")
    out = np.empty_like(query_rows)
    for module in spec.modules:
        grads = module_view(query_rows, spec, module.name)
        module_factors = factors[module.name]
        preconditioned = unrotate(rotate(grads, module_factors) * method.spectral(module_factors.lam),
                                  module_factors)
        out[:, module.offset:module.offset + module.width] = preconditioned.reshape(len(query_rows), -1)
    return out


def score_block(transformed: np.ndarray, train_rows: np.ndarray, method: Method) -> np.ndarray:
    """(Q, n) scores of transformed queries against a block of stored rows.

    The arithmetic runs in the stored precision: float64 for float64 stores (exact tests), float32 for
    float32/float16/bfloat16 rows, whose own rounding already exceeds float32's.
    """
    dtype = np.float64 if train_rows.dtype == np.float64 else np.float32
    train_rows = np.asarray(train_rows, dtype=dtype)
    scores = (np.asarray(transformed, dtype=dtype) @ train_rows.T).astype(np.float64)
    if method.normalise:
        norms = np.linalg.norm(train_rows.astype(np.float64), axis=1)
        scores = scores / np.where(norms > 0, norms, 1.0)[None, :]
    return scores


def score_block_per_module(transformed: np.ndarray, train_rows: np.ndarray, spec: ProjectionSpec,
                           method: Method) -> np.ndarray:
    """(M, Q, n): each module's share of the score; they sum to `score_block`."""
    train_rows = np.asarray(train_rows, dtype=np.float64)
    denominator = 1.0
    if method.normalise:
        norms = np.linalg.norm(train_rows, axis=1)
        denominator = np.where(norms > 0, norms, 1.0)[None, :]
    return np.stack([
        transformed[:, m.offset:m.offset + m.width] @ train_rows[:, m.offset:m.offset + m.width].T / denominator
        for m in spec.modules
    ])
