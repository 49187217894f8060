"""Apply a method to query gradients and score them against stored training rows.

Every method only changes the query side: q' = Q_S (F(Λ) ⊙ Q_Sᵀ G̃_q Q_A) Q_Aᵀ, and then
score(q, i) = ⟨q', G̃_i⟩ against the raw stored rows, so one store serves every method. A method over
several checkpoints produces one transformed query per set of stored rows (a `QueryTerm`), and the
score is the sum of the terms' inner products with their rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from engine.curvature.factors import ModuleFactors, rotate, unrotate
from engine.projection import ProjectionSpec
from engine.training_run.keys import ResourceKey

ModuleArrays = dict[str, np.ndarray]


class ScoringMethod(Protocol):
    """What scoring needs of a method (engine.spectral.methods.Method, which builds on this module, is one)."""

    @property
    def name(self) -> str: ...

    @property
    def normalise(self) -> bool: ...  # unit-normalise both sides (Grad-Cos)

    @property
    def spectral(self) -> Callable[[np.ndarray], np.ndarray] | None: ...  # F(Λ); None: F = 1


@dataclass
class QueryTerm:
    """A transformed query batch (Q, D) to be scored against the stored rows under `key`
    (a checkpoint, or a segment's averaged parameters)."""

    key: ResourceKey
    transformed: np.ndarray


def module_view(rows: np.ndarray, spec: ProjectionSpec, name: str) -> np.ndarray:
    module = next(m for m in spec.modules if m.name == name)
    block = rows[:, module.offset : module.offset + module.width]
    return block.reshape(rows.shape[0], module.k_out, module.k_in)


def apply_spectral(
    query_rows: np.ndarray,
    spec: ProjectionSpec,
    factors: dict[str, ModuleFactors],
    function: Callable[[np.ndarray], np.ndarray],
    scale_in: ModuleArrays | None = None,
    scale_out: ModuleArrays | None = None,
) -> np.ndarray:
    """Per module: scale_out ⊙ f(C)(scale_in ⊙ G̃) with f(C) = Q F(Λ) Qᵀ in the factors' basis, (Q, D) float64.

    The elementwise scales carry a diagonal preconditioner (Adam's P^{±1/2}); None means 1.
    """
    query_rows = np.asarray(query_rows, dtype=np.float64)
    out = np.empty_like(query_rows)
    for module in spec.modules:
        grads = module_view(query_rows, spec, module.name)
        if scale_in is not None:
            grads = grads * scale_in[module.name]
        module_factors = factors[module.name]
        result = unrotate(
            rotate(grads, module_factors) * function(module_factors.lam), module_factors, (module.k_out, module.k_in)
        )
        if scale_out is not None:
            result = result * scale_out[module.name]
        out[:, module.offset : module.offset + module.width] = result.reshape(len(query_rows), -1)
    return out


def normalise_rows(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def transform_queries(
    query_rows: np.ndarray, spec: ProjectionSpec, method: ScoringMethod, factors: dict[str, ModuleFactors] | None
) -> np.ndarray:
    """The query side of a single-checkpoint score, in the raw projected layout (Q, D), float64."""
    query_rows = np.asarray(query_rows, dtype=np.float64)
    if method.normalise:
        query_rows = normalise_rows(query_rows)
    if method.spectral is None:
        return query_rows
    if factors is None:
        raise ValueError(f"method {method.name} needs curvature factors")
    return apply_spectral(query_rows, spec, factors, method.spectral)


def score_block(transformed: np.ndarray, train_rows: np.ndarray, method: ScoringMethod) -> np.ndarray:
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


def score_terms(
    terms: list[QueryTerm],
    blocks: Callable[[ResourceKey], Iterable[tuple[int, int, np.ndarray]]],
    rows: int,
    method: ScoringMethod,
) -> np.ndarray:
    """(Q, rows): Σ over terms of the term's query side against its rows, streamed as (start, stop, block)."""
    total = np.zeros((terms[0].transformed.shape[0], rows))
    for term in terms:
        for start, stop, block in blocks(term.key):
            total[:, start:stop] += score_block(term.transformed, block, method)
    return total


def score_block_per_module(
    transformed: np.ndarray, train_rows: np.ndarray, spec: ProjectionSpec, method: ScoringMethod
) -> np.ndarray:
    """(M, Q, n): each module's share of the score; they sum to `score_block`."""
    train_rows = np.asarray(train_rows, dtype=np.float64)
    denominator = 1.0
    if method.normalise:
        norms = np.linalg.norm(train_rows, axis=1)
        denominator = np.where(norms > 0, norms, 1.0)[None, :]
    return np.stack(
        [
            transformed[:, m.offset : m.offset + m.width] @ train_rows[:, m.offset : m.offset + m.width].T / denominator
            for m in spec.modules
        ]
    )
