"""Approximate top-k for single-term methods: candidates from the ANN index, re-scored exactly from the store.

The index ranks by ⟨transformed query, stored row⟩ (or the unit-normalised rows for Grad-Cos), which is
every single-term method's score; its quantised scores choose the candidates, and with `rerank` N > 0 the
top N (and the bottom N) are read back (from the index's copy of the rows, or the store) and scored exactly, so the returned scores are exact
and the order is exact among the candidates (ties to the lower training index, as the scan orders them).
"""

from __future__ import annotations

import logging

import numpy as np

from engine.ann.index import AnnIndex
from engine.query.scoring import QueryResult, stored_rows_method
from engine.spectral.core import score_block
from engine.store import GradientStore

log = logging.getLogger(__name__)


def rank_approximate(
    index: AnnIndex, store: GradientStore, transformed: np.ndarray, normalise: bool, k: int, rerank: int
) -> QueryResult:
    """The top-k and bottom-k of every query from max(k, rerank) candidates each (no full scores)."""
    queries = len(transformed)
    ids, scores, found = index.search(transformed, normalise, max(k, rerank))
    width = min(k, int(found.min())) if len(found) else 0
    if width < min(k, index.record.indexed_rows):
        log.warning(
            "the ANN index found only %d candidates for a query (k = %d); rebuild it with more --probes or fewer "
            "--lists for more",
            width,
            k,
        )
    if rerank > 0:
        scores = _exact_scores(index, store, transformed, ids, normalise)
        scores[queries:] *= -1  # the second half ranks the most opposing rows first
    top, top_scores = _best(ids, scores, width)
    return QueryResult(top[:queries], top_scores[:queries], top[queries:], -top_scores[queries:], None)


def _exact_scores(
    index: AnnIndex, store: GradientStore, transformed: np.ndarray, ids: np.ndarray, normalise: bool
) -> np.ndarray:
    """Each candidate's exact score against its query, reading every distinct candidate row once: from the
    index's row copy, else from the store (which decodes each candidate's whole chunk)."""
    rows = np.unique(ids[ids >= 0])
    if not len(rows):
        return np.full(ids.shape, np.nan)
    stored = index.read_rows(rows)
    stored = store.read_row_selection(rows) if stored is None else stored
    exact = score_block(transformed, stored, stored_rows_method(normalise))  # (Q, U)
    exact = np.concatenate([exact, exact])  # the bottom searches' candidates are scored against the same queries
    out = np.take_along_axis(exact, np.searchsorted(rows, np.maximum(ids, rows[0])), axis=1)
    out[ids < 0] = np.nan
    return out


def _best(ids: np.ndarray, scores: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per search the `width` best candidates by score (ties to the lower row index); missing ones last."""
    top = np.empty((len(ids), width), dtype=np.int64)
    top_scores = np.empty((len(ids), width))
    for s in range(len(ids)):
        present = ids[s] >= 0
        candidates, values = ids[s][present], scores[s][present]
        order = np.lexsort((candidates, -values))[:width]
        top[s], top_scores[s] = candidates[order], values[order]
    return top, top_scores
