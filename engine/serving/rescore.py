"""`serve.rescore: K`: each request's store candidates (top-K and bottom-K of every query) re-scored with the
exact streamed pass (engine.exact), as `tributary query --rescore K` does for a query file.

One exact pass per batch scores every batch query against the union of the batch's candidates, but each request
is ranked among its own candidates only, so that its answer does not depend on which requests shared its batch
and equals `tributary query --rescore K` on the same queries. The pass runs in the replica, on the replica's
model, over the training rows of the store's shards that hold candidates.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from engine.config import JobConfig, QueryOptions
from engine.config.capabilities import check_capability
from engine.errors import TributaryError
from engine.exact.exact_query import ranked_among_exact, scored_columns
from engine.exact.queries import ExactQueries, check_query_rank, exact_queries
from engine.exact.stored_factors import full_spec, require_exact_factors
from engine.exact.worker import ExactWorker
from engine.gradients.context import with_projection
from engine.gradients.passes import gradient_pass
from engine.indexing.executor import LocalExecutor
from engine.query.attributor import Attributor, QueryGroup
from engine.query.generate import token_pieces
from engine.query.records import result_records
from engine.query.scoring import QueryResult
from engine.serving.responses import RequestError


def check_rescore_inputs(config: JobConfig, opened) -> None:
    """Refuse, before the service starts, a `serve.rescore` its store or method cannot serve (one line each)."""
    if config.serve.rescore is None:
        return
    check_capability(config.method.name, config.placement.kind, opened.kind, ("exact",))
    check_one_checkpoint(config.method.name)
    final = opened.final_store()  # a training run's exact pass runs at its final checkpoint
    if config.method.name == "if":
        require_exact_factors(final)
    check_query_rank(config.exact.query_rank, full_spec(final))


def check_one_checkpoint(method: str) -> None:
    """The replica's exact pass runs at the final checkpoint alone: tracin's pass per checkpoint is the query's."""
    if method == "tracin":
        raise TributaryError(
            "serve.rescore scores at the final checkpoint, and method tracin sums over the run's checkpoints; "
            "use tributary query --exact for tracin, or serve another method"
        )


def candidate_options(options: QueryOptions, rescore: int) -> QueryOptions:
    """What the store is asked for: each query's top-K and bottom-K candidates."""
    return replace(options, k=rescore)


class BatchRescorer:
    """The replica's exact pass: its worker keeps the training rows and the model between batches."""

    def __init__(self, attributor: Attributor):
        self.attributor = attributor
        self.config = attributor.opened.final_config(attributor.config)  # a training run's final checkpoint's
        store = attributor.store
        self.full = full_spec(store)
        self.full_context = with_projection(attributor.context, self.full)
        self.factors = require_exact_factors(store) if self.config.method.name == "if" else None
        self.worker: ExactWorker | None = None

    def records(
        self, groups: list[QueryGroup], candidates: list[QueryResult], options: list[QueryOptions]
    ) -> list[list[dict] | RequestError]:
        """Each group's records ranked by exact score among its candidates (or the 422 refusal naming why
        its queries have no exact form), each listed example marked `exact` or `store`."""
        outcomes: list[list[dict] | RequestError | None] = [None] * len(groups)
        sides: dict[bool, list[tuple[int, ExactQueries]]] = {}
        for g, group in enumerate(groups):
            try:
                side = self._query_side(group)
            except TributaryError as error:
                outcomes[g] = RequestError(422, str(error), "queries")
                continue
            sides.setdefault(side.normalise, []).append((g, side))
        for members in sides.values():
            wanted = [_candidates(candidates[g]) for g, _ in members]
            scores = self._scores([side for _, side in members], np.unique(np.concatenate(wanted)))
            start = 0
            for (g, side), rows in zip(members, wanted):
                stop = start + side.count
                outcomes[g] = self._ranked_records(groups[g], scores[start:stop], rows, candidates[g], options[g])
                start = stop
        return [outcome for outcome in outcomes if outcome is not None]

    def _query_side(self, group: QueryGroup) -> ExactQueries:
        check_capability(group.method.name, self.config.placement.kind, None, ("exact",))
        check_one_checkpoint(group.method.name)
        factors = self.factors
        if group.method.needs_curvature and factors is None:
            factors = self.factors = require_exact_factors(self.attributor.store)
        rows = [query.row for query in group.queries]
        grads = gradient_pass(
            self.full_context, rows, with_covariance=False, measurement=group.options.measurement
        ).grads
        bad = np.flatnonzero(~np.isfinite(grads).all(axis=1))
        if len(bad):
            names = ", ".join(f'"{group.queries[q].id}"' for q in bad[:5])
            raise TributaryError(
                f"query {names}: its gradient is not finite (NaN/inf), so it has no exact scores; check the query"
            )
        return exact_queries(grads, self.full, group.method, factors, self.config.exact.query_rank)

    def _scores(self, sides: list[ExactQueries], rows: np.ndarray) -> np.ndarray:
        """(Q, N) exact scores of every query of `sides` (one normalisation) against `rows`, NaN elsewhere."""
        first = sides[0]
        whole = {name: np.concatenate([side.whole[name] for side in sides]) for name in first.whole}
        low_rank = {
            name: tuple(np.concatenate([side.low_rank[name][i] for side in sides]) for i in (0, 1))
            for name in first.low_rank
        }
        queries = ExactQueries(first.spec, first.normalise, whole, low_rank, rows.astype(np.int64))  # pyright: ignore[reportArgumentType]
        if self.worker is None:
            self.worker = ExactWorker(self.config, queries, context=self.attributor.context)
        self.worker.use_queries(queries)
        total, _ = scored_columns(self.attributor.store, queries, LocalExecutor(worker=self.worker))
        return total

    def _ranked_records(
        self, group: QueryGroup, total: np.ndarray, rows: np.ndarray, stored: QueryResult, options: QueryOptions
    ) -> list[dict]:
        """Ranked among this group's candidates; where fewer than top_k were, the rest follow in the store's
        order with the store's scores (when the scan kept every score, as a scan in the replica does)."""
        attributor = self.attributor
        exact = np.zeros(total.shape[1], dtype=bool)
        exact[rows] = True
        exact &= ~np.isnan(total[0])
        outside = np.nan if stored.total is None else stored.total  # another request's candidates are not its own
        mine = np.where(exact[None, :], total, outside)
        result = ranked_among_exact(mine, exact, options.k, attributor.skipped.tolist())
        pieces = [token_pieces(attributor.context.tokenizer, query.row) for query in group.queries]
        records = result_records(
            group.queries,
            result,
            attributor.ids,
            attributor.snippets,
            group.method.name,
            options.measurement,
            attributor.module_names,
            pieces,
        )
        for record in records:
            for entry in (*record["top_k"], *record["bottom_k"]):
                entry["source"] = "exact" if exact[entry["index"]] else "store"
        return records


def _candidates(result: QueryResult) -> np.ndarray:
    return np.union1d(result.top_indices.ravel(), result.bottom_indices.ravel()).astype(np.int64)
