"""Scoring by row ranges: each scorer owns a contiguous row range of the store, scores a whole batch of
queries against it in one read, and returns its top-k (and, on request, its score columns). The caller
merges the candidates with the same deterministic order as a dense top-k.

On a cluster, `tributary query` starts one Ray actor per range for a run (engine.local_or_ray) and `tributary serve`
deploys one long-lived scorer per range that every service replica sends its batches to (engine.serving)."""

from __future__ import annotations

import numpy as np

from engine.query.scoring import QueryResult, merge_top_k, stored_rows_method, top_k_with_scores
from engine.spectral.core import score_block

RangePart = tuple  # (top + start, top scores, bottom + start, bottom scores, columns or None) of one range


class RowRangeScorer:
    def __init__(self, store_path: str, start_shard: int, stop_shard: int, threads: int = 1):
        import torch

        from engine.store import GradientStore

        torch.set_num_threads(threads)
        self.store = GradientStore.open(store_path)  # read-only
        shards = self.store.shards()[start_shard:stop_shard]
        self.start, self.stop = shards[0][0], shards[-1][1]
        self.shards = shards

    def score(self, transformed: np.ndarray, normalise: bool, k: int, full: bool) -> RangePart:
        method = stored_rows_method(normalise)
        columns = np.empty((transformed.shape[0], self.stop - self.start))
        for start, stop, block in self.store.iter_chunks(self.shards):
            columns[:, start - self.start : stop - self.start] = score_block(transformed, block, method)
        top, top_values = top_k_with_scores(columns, k)
        bottom, bottom_values = top_k_with_scores(-columns, k)
        return top + self.start, top_values, bottom + self.start, -bottom_values, (columns if full else None)


def row_ranges(shards: int, scorers: int) -> list[tuple[int, int]]:
    """Contiguous shard ranges [a, b), one per scorer (fewer when there are fewer shards than scorers)."""
    bounds = np.linspace(0, shards, min(scorers, shards) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def merge_parts(parts: list[RangePart], k: int, full: bool) -> QueryResult:
    """The ranges' candidates merged in range order: the dense top-k, ties to the lower training index."""
    top, top_values = merge_top_k([p[0] for p in parts], [p[1] for p in parts], k)
    bottom, bottom_values = merge_top_k([p[2] for p in parts], [-p[3] for p in parts], k)
    total = np.concatenate([p[4] for p in parts], axis=1) if full else None
    return QueryResult(top, top_values, bottom, -bottom_values, total)
