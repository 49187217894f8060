"""Stream the store's row-chunks once for a whole batch of queries; deterministic top-k."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.spectral.core import score_block
from engine.spectral.methods import Method
from engine.store import GradientStore


@dataclass
class QueryResult:
    top_indices: np.ndarray  # (Q, k), best first, ties to the lower training index
    top_scores: np.ndarray  # (Q, k)
    bottom_indices: np.ndarray  # (Q, k): most opposing first (most negative score)
    bottom_scores: np.ndarray
    total: np.ndarray | None  # (Q, N) full scores; on a cluster only when --scores-out asks for them
    per_module: dict[str, list[np.ndarray]] | None = None  # "top"/"bottom" → per query (k, M)
    per_token: dict[str, list[np.ndarray]] | None = None  # "top"/"bottom" → per query (k, T)
    records: list[dict] | None = None  # the results JSONL records

    def written_records(self) -> list[dict]:
        """The results JSONL records, which Attributor.attribute adds to every result it returns."""
        if self.records is None:
            raise RuntimeError("this QueryResult has no records: only Attributor.attribute's results have them")
        return self.records

    def select(self, start: int, stop: int, k: int) -> QueryResult:
        """Queries start..stop with their first k entries: a top-k list's prefix is the smaller top-k."""
        total = None if self.total is None else self.total[start:stop]
        return QueryResult(
            self.top_indices[start:stop, :k],
            self.top_scores[start:stop, :k],
            self.bottom_indices[start:stop, :k],
            self.bottom_scores[start:stop, :k],
            total,
        )


def without_rows(result: QueryResult, excluded: np.ndarray, k: int) -> QueryResult:
    """`result` (ranked to k + len(excluded)) with the `excluded` rows dropped from its top and bottom lists, cut
    to k: rows the index skipped for non-finite values are never ranked (their full scores stay 0)."""
    if len(excluded) == 0:
        return result.select(0, len(result.top_indices), k)

    def keep(indices: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mask = ~np.isin(indices, excluded)
        width = min(k, int(mask.sum(axis=1).min()) if len(indices) else 0)
        out_i = np.stack([row[m][:width] for row, m in zip(indices, mask)]) if len(indices) else indices[:, :0]
        out_s = np.stack([row[m][:width] for row, m in zip(scores, mask)]) if len(scores) else scores[:, :0]
        return out_i, out_s

    top, top_scores = keep(result.top_indices, result.top_scores)
    bottom, bottom_scores = keep(result.bottom_indices, result.bottom_scores)
    return QueryResult(top, top_scores, bottom, bottom_scores, result.total)


def stored_rows_method(normalise: bool) -> Method:
    """What the store side of a score needs to know of a method: only whether rows are unit-normalised."""
    return Method("stored-rows", needs_curvature=False, normalise=normalise, spectral=None)


def score_store(store: GradientStore, transformed: np.ndarray, method: Method) -> np.ndarray:
    """(Q, N) scores, reading each row-chunk of the store once for the whole query batch."""
    total = np.empty((transformed.shape[0], store.rows))
    for start, stop, rows in store.iter_chunks():
        total[:, start:stop] = score_block(transformed, rows, method)
    return total


def rank_store(
    store: GradientStore, transformed: np.ndarray, normalise: bool, k: int, full: bool = True
) -> QueryResult:
    """One pass over the store in this process: the top-k supporters and opposers of every query, and the
    full scores (here they exist anyway, so `full` changes nothing)."""
    total = score_store(store, transformed, stored_rows_method(normalise))
    top, top_scores = top_k_with_scores(total, k)
    bottom, bottom_scores = top_k_with_scores(-total, k)
    return QueryResult(top, top_scores, bottom, -bottom_scores, total)


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
