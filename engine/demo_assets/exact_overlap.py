"""`tributary demo --exact`: how many of the store's top-10 training rows are exact EK-FAC's top-10.

The demo's index is projected (dim 16): its rankings are approximate. With `--exact` the demo also fits the
full-width factors at index time (`exact: {factors: true}`: one Λ pass more, the covariances are pass 1's) and
runs `query --exact` on the demo's queries, one pass over the training rows, writing no rows. Off by default:
on the SmolLM2 demo the extra passes take minutes on 2 CPU cores (README "Exact answers").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from engine.config import JobConfig, QueryOptions
from engine.local_or_ray import run_exact, run_query

TOP = 10


@dataclass
class Overlap:
    ids: list[str]  # the queries' ids, in the queries file's order
    shares: list[float]  # per query: |store top-10 ∩ exact top-10| / 10
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of the store query and of `query --exact`

    @property
    def mean(self) -> float:
        return float(np.mean(self.shares))

    def line(self) -> str:
        each = ", ".join(f"{query} {share:.0%}" for query, share in zip(self.ids, self.shares))
        return f"store (dim 16) top-{TOP} shared with exact EK-FAC's top-{TOP}: mean {self.mean:.0%} ({each})"


def exact_overlap(config: JobConfig, queries_path: str) -> Overlap:
    """The store's and the exact pass's top-10 of every query in `queries_path`, compared."""
    options = QueryOptions(k=TOP)
    started = time.perf_counter()
    stored = run_query(config, queries_path, TOP, options=options)
    queried = time.perf_counter()
    exact = run_exact(config, queries_path, options)
    seconds = {"store_query": round(queried - started, 1), "exact_query": round(time.perf_counter() - queried, 1)}
    shares = [
        len(set(ours.tolist()) & set(theirs.tolist())) / TOP
        for ours, theirs in zip(stored.top_indices, exact.result.top_indices)
    ]
    return Overlap([record["id"] for record in exact.records], shares, seconds)
