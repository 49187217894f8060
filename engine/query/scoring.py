"""Stream the store's row-chunks once for a whole batch of queries; deterministic top-k."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.projection import ProjectionSpec
from engine.spectral.core import score_block, score_block_per_module
from engine.spectral.methods import Method
from engine.store import GradientStore


@dataclass
class Scores:
    total: np.ndarray  # (Q, N) float64, columns in training-file order
    per_module: np.ndarray | None  # (M, Q, N) when asked for


def score_store(store: GradientStore, transformed: np.ndarray, method: Method, spec: ProjectionSpec,
                per_module: bool = False) -> Scores:
    total = np.empty((transformed.shape[0], store.rows))
    modules = np.empty((len(spec.modules), transformed.shape[0], store.rows)) if per_module else None
    for start, stop, rows in store.iter_chunks():
        total[:, start:stop] = score_block(transformed, rows, method)
        if modules is not None:
            modules[:, :, start:stop] = score_block_per_module(transformed, rows, spec, method)
    return Scores(total, modules)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) row indices, highest score first; ties go to the lower row index."""
    k = min(k, scores.shape[1])
    order = np.empty((scores.shape[0], k), dtype=np.int64)
    columns = np.arange(scores.shape[1])
    for q, row in enumerate(scores):
        order[q] = np.lexsort((columns, -row))[:k]
    return order
