"""The exact path's stages on one rank of a ZeRO-3 group (placement.kind zero3): indexing's ZeroShardWorker (the
group's join, its facts and batch counts) running ExactWorker's stage bodies in lockstep.

Parameters are partitioned over the ranks, but each module's activations and output gradients are whole in the
forward and backward (the weights are all-gathered there), so the capture at full width sees the full module
shapes: the full-width covariances, Λ and streamed scores of a rank's rows are those a single process gives.
Every stage takes `(shard | None, batches)` and runs padding batches up to the group's common count, so every
rank makes the same all-gathers; a rank without a shard this step returns None.
"""

from __future__ import annotations

import numpy as np

from engine.config import JobConfig
from engine.data.tokenize import TokenizedRow
from engine.exact.queries import ExactQueries
from engine.exact.worker import ExactWorker
from engine.gradients.context import with_projection
from engine.gradients.passes import gradient_pass
from engine.indexing.zero_worker import ZeroShardWorker
from engine.projection.fitted import full_width


class ZeroExactWorker(ZeroShardWorker, ExactWorker):
    def __init__(self, config: JobConfig, queries: ExactQueries | None = None, threads: int | None = None):
        ZeroShardWorker.__init__(self, config, threads)  # the model is loaded in join(), partitioned
        self.queries = queries
        self._side = None
        self._basis = None

    def join(self, rank: int, world: int, address: str, port: int) -> dict:
        facts = super().join(rank, world, address, port)
        self.full = with_projection(self.context, full_width(self.context.spec))
        return facts

    def exact_query_gradients(self, rows: list[TokenizedRow], measurement: str) -> np.ndarray:
        """Full-width gradients of `measurement` for query rows; every rank gets the same rows (their batches and
        all-gathers line up), and the driver keeps rank 0's."""
        return gradient_pass(self.full, rows, with_covariance=False, measurement=measurement).grads

    def exact_covariance(self, shard: int | None, batches: int) -> dict | None:  # pyright: ignore[reportIncompatibleMethodOverride]
        return self._exact_covariance(shard, batches)

    def exact_lambdas(self, shard: int | None, batches: int) -> dict | None:  # pyright: ignore[reportIncompatibleMethodOverride]
        return self._exact_lambdas(shard, batches)

    def exact_scores(self, shard: int | None, batches: int) -> dict | None:  # pyright: ignore[reportIncompatibleMethodOverride]
        return self._exact_scores(shard, batches)
