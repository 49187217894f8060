"""The exact path's shard worker: indexing's ShardWorker (same rows, shards, receipts and store handling) with
the model captured at full width, for three stages: the full-width covariance sums, the full-width Λ sums
(both written to the store as per-shard partials, as indexing's are), and the streamed scores of a shard's rows
(returned in the receipt; the driver places them by row, so completion order changes nothing)."""

from __future__ import annotations

import time

import numpy as np
import torch

from engine.capture.loss import NextTokenLoss
from engine.config import JobConfig
from engine.curvature.factors import ModuleFactors
from engine.curvature.packing import pack_covariance, pack_lambda
from engine.data.tokenize import TokenizedRow
from engine.exact.partition import lambda_stage, module_groups
from engine.exact.queries import ExactQueries
from engine.exact.row_scores import QuerySide, ScoringBlock
from engine.exact.stored_factors import BASIS, lambda_group, read_exact_factors
from engine.gradients.context import ModelContext, with_projection
from engine.gradients.finite import nonfinite_rows_error
from engine.gradients.passes import covariance_pass, lambda_pass, padded_batches
from engine.indexing.worker import ShardWorker
from engine.projection.fitted import full_width
from engine.testing.faults import fault_point


class ExactWorker(ShardWorker):
    def __init__(
        self,
        config: JobConfig,
        queries: ExactQueries | None = None,
        threads: int | None = None,
        context: ModelContext | None = None,
    ):
        super().__init__(config, threads, context)
        self.full = with_projection(self.context, full_width(self.context.spec))
        self.queries = queries
        self._side: QuerySide | None = None
        self._basis: dict[str, ModuleFactors] | None = None

    def _kept_rows(self, shard: int | None) -> tuple[int, list[int], list[TokenizedRow]]:
        """(start, positions in the shard of the rows pass 1 kept, those rows tokenised); None: no rows (a ZeRO-3
        rank with padding only this step)."""
        if shard is None:
            return 0, [], []
        store = self._open()
        start, stop = store.shards()[shard]
        rows = self._tokenized(start, stop)
        kept = self._kept(store, start, stop)
        return start, kept, [rows[p] for p in kept]

    def exact_covariance(self, shard: int) -> dict:
        """Full-width K-FAC covariance sums of the shard's rows (curvature labels), as pass 1's at dim 0."""
        return _given(self._exact_covariance(shard, None))

    def exact_lambdas(self, shard: int) -> dict:
        """Full-width Σ (Q_Sᵀ G Q_A)² of the shard's rows in the full-width eigenbasis, for the modules of the group
        the driver runs (engine.exact.partition: this worker holds that group's bases alone)."""
        return _given(self._exact_lambdas(shard, None))

    def exact_scores(self, shard: int) -> dict:
        """(Q, n) scores of the shard's wanted rows against the queries, with their global row numbers."""
        return _given(self._exact_scores(shard, None))

    # Each stage's body: `shard` None runs `pad_batches` padding batches only and returns None, and `pad_batches`
    # pads a shard's own batches up to that count (a ZeRO-3 group's lockstep, engine.exact.zero_worker).
    def _exact_covariance(self, shard: int | None, pad_batches: int | None) -> dict | None:
        started = time.perf_counter()
        start, kept, rows = self._kept_rows(shard)
        sums, found = covariance_pass(self.full, rows, upcast=True, pad_batches=pad_batches)
        if shard is None:
            return None
        if found:
            raise nonfinite_rows_error(
                {kept[p]: names for p, names in found.items()},
                self._ids(*self._open().shards()[shard]),
                start,
                self.config.data.train,
            )
        fault_point("actor", "exact_covariance", shard)
        self._open().write_partial("exact_covariance", shard, *pack_covariance(sums, self.full.spec))
        return self._receipt("exact_covariance", shard, started)

    def _exact_lambdas(self, shard: int | None, pad_batches: int | None) -> dict | None:
        started = time.perf_counter()
        store = self._open()
        groups = module_groups(self.full.spec, self.config.exact.factor_memory_gb)
        number = lambda_group(store)
        group = groups[number]
        if self._basis is None:
            self._basis = read_exact_factors(store, BASIS, {m.name for m in group.modules})
        start, kept, rows = self._kept_rows(shard)
        check = None if shard is None else self._row_check(self._ids(*store.shards()[shard]), start, kept)
        sums = lambda_pass(self.full, rows, self._basis, on_nonfinite=check, pad_batches=pad_batches, spec=group)
        if shard is None:
            return None
        key, partials = lambda_stage(number, len(groups))
        fault_point("actor", key, shard)
        store.write_partial(partials, shard, *pack_lambda(sums.lambdas, group))
        return self._receipt(key, shard, started)

    def use_queries(self, queries: ExactQueries) -> None:
        """Score against other queries from now on (a service's next batch), keeping the loaded rows and model."""
        self.queries = queries
        self._side = None

    def _exact_scores(self, shard: int | None, pad_batches: int | None) -> dict | None:
        started = time.perf_counter()
        if self.queries is None:
            raise RuntimeError("exact_scores needs the queries the worker was built with")
        start, kept, rows = self._kept_rows(shard)
        wanted = self.queries.rows
        if wanted is not None:
            chosen = set(wanted.tolist())
            rows = [row for p, row in zip(kept, rows) if start + p in chosen]
            kept = [p for p in kept if start + p in chosen]
        scores = self._scores(rows, pad_batches)
        if shard is None:
            return None
        fault_point("actor", "exact_scores", shard)
        receipt = self._receipt("exact_scores", shard, started)
        receipt.update(rows=np.asarray([start + p for p in kept], dtype=np.int64), scores=scores)
        return receipt

    def _scores(self, rows: list[TokenizedRow], pad_batches: int | None) -> np.ndarray:
        assert self.queries is not None
        context = self.full
        capture = context.capture
        if self._side is None:
            self._side = QuerySide.of(self.queries, capture.compute_dtype, context.device)
        block = ScoringBlock(self._side)
        parts = [np.zeros((self.queries.count, 0))]
        with capture.hooks():
            for batch, padding in padded_batches(context, rows, pad_batches):
                batch = batch.to(context.device)
                state = capture.forward(batch)
                logit_gradient = NextTokenLoss(state.logits).logit_gradient(batch.labels)
                deltas = capture.output_gradients_of_logits(state, logit_gradient, retain_graph=False)
                if padding:
                    continue
                block.add(state.activations, deltas)
                del state  # its outputs hold the batch's autograd graph; the block keeps the captures alone
                if block.full():
                    parts.append(_scored(block))
        if block.rows:
            parts.append(_scored(block))
        return np.concatenate(parts, axis=1)

    def reset(self) -> None:
        super().reset()
        self._basis = None


def _scored(block: ScoringBlock) -> np.ndarray:
    with torch.no_grad():
        return block.scores().double().cpu().numpy()


def _given(receipt: dict | None) -> dict:
    """A stage's receipt for a shard (only a padding-only ZeRO-3 step has none)."""
    if receipt is None:
        raise RuntimeError("a stage run on a shard returned no receipt")
    return receipt
