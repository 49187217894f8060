"""Stream the store's row-chunks once for a whole batch of queries; deterministic top-k."""

from __future__ import annotations

import numpy as np

from engine.spectral.core import score_block
from engine.spectral.methods import Method
from engine.store import GradientStore


def score_store(store: GradientStore, transformed: np.ndarray, method: Method) -> np.ndarray:
    """(Q, N) scores, reading each row-chunk of the store once for the whole query batch."""
    total = np.empty((transformed.shape[0], store.rows))
    for start, stop, rows in store.iter_chunks():
        total[:, start:stop] = score_block(transformed, rows, method)
    return total


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) row indices, highest score first; ties go to the lower row index."""
    k = min(k, scores.shape[1])
    order = np.empty((scores.shape[0], k), dtype=np.int64)
    columns = np.arange(scores.shape[1])
    for q, row in enumerate(scores):
        order[q] = np.lexsort((columns, -row))[:k]
    return order


def top_k_with_scores(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = top_k(scores, k)
    return order, np.take_along_axis(scores, order, axis=1)


def merge_top_k(indices: list[np.ndarray], values: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-range top-k lists: the same order as `top_k` on the full matrix (ties → lower index)."""
    all_indices = np.concatenate(indices, axis=1)
    all_values = np.concatenate(values, axis=1)
    k = min(k, all_indices.shape[1])
    merged_indices = np.empty((all_indices.shape[0], k), dtype=np.int64)
    merged_values = np.empty((all_indices.shape[0], k))
    for q in range(all_indices.shape[0]):
        order = np.lexsort((all_indices[q], -all_values[q]))[:k]
        merged_indices[q], merged_values[q] = all_indices[q, order], all_values[q, order]
    return merged_indices, merged_values
