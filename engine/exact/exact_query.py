"""`tributary query --exact` and `--rescore K`: exact scores from a streamed pass over the training rows.

The query side is each query's full-width gradient preconditioned with the store's full-width factors
(engine.exact.queries); the training side is one forward and backward per batch of training rows, sharded as
indexing is (the executor is handed in: this process, or Ray actors from engine.local_or_ray), each shard's scores
placed by row number, so 1 or N workers give the same matrix. `--rescore K` asks the store (or its ANN index)
for each query's top-K and bottom-K candidates and runs the exact pass over their union alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.config import JobConfig, QueryOptions
from engine.config.capabilities import check_capability
from engine.data.rows import field_names, read_rows
from engine.data.tokenize import tokenize_rows
from engine.errors import TributaryError
from engine.exact.checkpoints import ScoredCheckpoint, scored_checkpoints
from engine.exact.queries import ExactQueries, check_query_rank, exact_queries
from engine.exact.stored_factors import full_spec, read_exact_factors, require_stored_factors
from engine.gradients.context import ModelContext, load_model_context, with_projection
from engine.gradients.passes import gradient_pass
from engine.indexing.executor import ShardExecutor
from engine.projection import ProjectionSpec
from engine.query.attributor import check_compatible, open_complete_store
from engine.query.scoring import QueryResult, top_k
from engine.store import GradientStore
from engine.store.budget import budgeted_context
from engine.training_run.plan import RunPlan

# (config, queries, the driver's loaded model or None) → the executor of the `exact_scores` stage
ExactExecutors = Callable[[JobConfig, ExactQueries, ModelContext | None], ShardExecutor]
Candidates = Callable[[int], QueryResult]  # the store's top-K and bottom-K of every query, for --rescore K


@dataclass
class ExactResult:
    result: QueryResult  # ranked among the exactly scored rows
    scores: np.ndarray  # (Q, N): exact where `exact`, else the store's score (--rescore) or NaN
    exact: np.ndarray  # (N,) bool: the columns of `scores` that are exact
    records: list[dict]


def check_exact_options(options: QueryOptions, rescore: int | None) -> None:
    if rescore is not None and rescore <= 0:
        raise TributaryError(
            f"--rescore must be positive, got {rescore}; give how many store candidates per query and side "
            "the exact pass re-scores"
        )
    for flag, used in (
        ("--per-module", options.per_module),
        ("--per-token", options.per_token),
        ("--generate", options.generation is not None),
    ):
        if used:
            raise TributaryError(f"{flag} does not combine with --exact/--rescore yet; drop {flag}")
    if options.approximate and rescore is None:
        raise TributaryError("--approximate with --exact: the exact pass scores every row; drop --approximate")


def run_exact_query(
    config: JobConfig,
    queries_path: str,
    options: QueryOptions,
    executors: ExactExecutors,
    out: str | None = None,
    scores_out: str | None = None,
    rescore: int | None = None,
    candidates: Candidates | None = None,
    local_context: bool = True,
    load_context: Callable[[JobConfig], ModelContext] = load_model_context,
) -> ExactResult:
    """Exact scores of every query against every training row (or, with `rescore`, the union of the store's
    candidates); `local_context`: the scoring executor runs in this process and may reuse the loaded model.
    `load_context`: the model, here or (placement zero3) held by a group of ranks that also gives the queries'
    full-width gradients."""
    check_exact_options(options, rescore)
    check_capability(config.method.name, config.placement.kind, None, ("exact",))
    opened = open_complete_store(config.store.path)
    check_capability(config.method.name, config.placement.kind, opened.kind, ("exact",))
    check_exact_run(opened.run_plan(config))
    # A training run's single-term methods score at its final checkpoint (its weights, rows, sub-store and
    # factors); tracin at every checkpoint, weighted by its learning rate (engine.exact.checkpoints).
    checkpoints = scored_checkpoints(config, opened)
    for checkpoint in checkpoints:
        if checkpoint.method.needs_curvature:
            require_stored_factors(checkpoint.store)
        check_query_rank(config.exact.query_rank, full_spec(checkpoint.store))
    final = checkpoints[-1]
    config, store = final.config, final.store
    rows = read_rows(queries_path, field_names(config), what="queries file")
    stored = None
    union = None
    if rescore is not None:  # before the model is loaded: a zero3 query's candidates need the cluster's CPUs free
        if candidates is None:
            raise RuntimeError("--rescore needs the store's candidates")
        stored = candidates(rescore)
        union = np.union1d(stored.top_indices.ravel(), stored.bottom_indices.ravel()).astype(np.int64)
    total = np.zeros((len(rows), store.rows))
    exact = np.zeros(store.rows, dtype=bool)
    for checkpoint in checkpoints:
        scores, exact = _checkpoint_scores(
            checkpoint, rows, queries_path, options.measurement, union, executors, local_context, load_context
        )
        total += checkpoint.weight * scores
    if stored is not None and stored.total is not None:
        total = np.where(exact[None, :], total, stored.total)
    result = _ranked(total, exact, options.k, [row.row for row in store.manifest.skipped])
    ids = store.ids()
    records = [
        _record(
            q, row.id, config.method.name, options.measurement, result, ids, "rescore" if rescore else "exact", exact
        )
        for q, row in enumerate(rows)
    ]
    _write(out, scores_out, records, total)
    return ExactResult(result, total, exact, records)


def _checkpoint_scores(
    checkpoint: ScoredCheckpoint,
    rows: list,
    queries_path: str,
    measurement: str,
    union: np.ndarray | None,
    executors: ExactExecutors,
    local_context: bool,
    load_context: Callable[[JobConfig], ModelContext],
) -> tuple[np.ndarray, np.ndarray]:
    """The exact pass at one checkpoint: its model's full-width query gradients, preconditioned by its method,
    scored against its rows (`union`: those alone)."""
    config, store, method = checkpoint.config, checkpoint.store, checkpoint.method
    full = full_spec(store)
    factors = read_exact_factors(store) if method.needs_curvature else None
    context = budgeted_context(config, load_context(config))
    check_compatible(store, context, config)
    tokenized = tokenize_rows(rows, context.tokenizer, config.data.max_length, queries_path)
    grads = _full_gradients(context, full, tokenized, measurement)
    require_finite_query_gradients(grads, [row.id for row in rows])
    queries = exact_queries(grads, full, method, factors, config.exact.query_rank).restricted(union)
    return _score(store, queries, executors(config, queries, context if local_context else None))


def check_exact_run(plan: RunPlan) -> None:
    """The exact pass scores the final checkpoint's rows: a run over several datasets has others."""
    datasets = len(plan.datasets)
    if datasets > 1:
        raise TributaryError(
            f"--exact/--rescore score the final checkpoint's training rows, but this training run has {datasets} "
            "datasets; index the run with one dataset, or query without --exact/--rescore"
        )


def _full_gradients(context: ModelContext, full: ProjectionSpec, rows: list, measurement: str) -> np.ndarray:
    """The queries' full-width gradients: from the model here, or from the zero3 group holding it (its ranks
    capture at full width themselves, engine.exact.zero_worker)."""
    if context.remote_gradients is not None:
        return context.remote_gradients(rows, measurement)
    return gradient_pass(with_projection(context, full), rows, with_covariance=False, measurement=measurement).grads


def require_finite_query_gradients(grads: np.ndarray, ids: list[str]) -> None:
    """A query whose gradient is NaN/inf would score every row NaN (which the merge reads as not scored)."""
    # NaN and inf carry into a sum, so a row whose float64 sum is finite is; only the others (non-finite, or float64
    # numbers near the limit overflowing the sum) are checked number by number, and no (Q, D) boolean array is made
    # (0.13 GB on issue 13's workload)
    suspects = np.flatnonzero(~np.isfinite(grads.sum(axis=1, dtype=np.float64)))
    bad = [q for q in suspects if not np.isfinite(grads[q]).all()]
    if len(bad):
        names = ", ".join(f'"{ids[q]}"' for q in bad[:5])
        raise TributaryError(
            f"query {names}: its gradient is not finite (NaN/inf), so it has no scores; the model overflows or "
            "holds NaN weights on this query: check the query, model.path and model.dtype"
        )


def scored_columns(
    store: GradientStore, queries: ExactQueries, executor: ShardExecutor
) -> tuple[np.ndarray, np.ndarray]:
    """The exact pass over `queries.rows` (all rows when None): (Q, N) scores, NaN where not scored, and which
    columns were scored (for callers that pick their candidates themselves, as `serve.rescore` does)."""
    return _score(store, queries, executor)


def ranked_among_exact(total: np.ndarray, exact: np.ndarray, k: int, skipped: list[int]) -> QueryResult:
    """Top and bottom k among the exactly scored columns, then the store's order, as --rescore ranks them."""
    return _ranked(total, exact, k, skipped)


def _score(store: GradientStore, queries: ExactQueries, executor: ShardExecutor) -> tuple[np.ndarray, np.ndarray]:
    """(Q, N) scores (NaN where not scored) and which columns were scored, from the shards holding wanted rows."""
    shards = store.shards()
    wanted = queries.rows
    numbers = list(range(len(shards)))
    if wanted is not None:
        numbers = [i for i, (a, b) in enumerate(shards) if np.any((wanted >= a) & (wanted < b))]
    total = np.full((queries.count, store.rows), np.nan)
    try:
        for receipt in executor.run("exact_scores", numbers):
            total[:, receipt["rows"]] = receipt["scores"]
    finally:
        executor.shutdown()
    return total, ~np.isnan(total[0]) if len(total) else np.zeros(store.rows, dtype=bool)


def _ranked(total: np.ndarray, exact: np.ndarray, k: int, skipped: list[int]) -> QueryResult:
    """Each query's top and bottom k among the exactly scored rows; where fewer than k were (--rescore with a
    small K), the rest follow in the store's order, with the store's scores. Skipped rows are never ranked."""
    columns = np.flatnonzero(exact)
    outside = np.isfinite(total[0]) & ~exact if len(total) else np.zeros_like(exact)
    outside[skipped] = False
    others = np.flatnonzero(outside)

    def ranked(sign: float) -> np.ndarray:
        first = columns[top_k(sign * total[:, columns], k)]
        wanted = k - first.shape[1]
        if wanted <= 0 or not len(others):
            return first
        return np.concatenate([first, others[top_k(sign * total[:, others], wanted)]], axis=1)

    top, bottom = ranked(1.0), ranked(-1.0)
    return QueryResult(top, np.take_along_axis(total, top, 1), bottom, np.take_along_axis(total, bottom, 1), total)


def _record(
    q: int,
    query_id: str,
    method: str,
    measurement: str,
    result: QueryResult,
    ids: list[str],
    mode: str,
    exact: np.ndarray,
) -> dict:
    def listed(indices: np.ndarray, scores: np.ndarray) -> list[dict]:
        return [
            {
                "rank": r + 1,
                "index": int(i),
                "id": ids[int(i)],
                "score": float(s),
                "source": "exact" if exact[int(i)] else "store",
            }
            for r, (i, s) in enumerate(zip(indices, scores))
        ]

    return {
        "query": q,
        "id": query_id,
        "method": method,
        "measurement": measurement,
        "mode": mode,
        "top_k": listed(result.top_indices[q], result.top_scores[q]),
        "bottom_k": listed(result.bottom_indices[q], result.bottom_scores[q]),
    }


def _write(out: str | None, scores_out: str | None, records: list[dict], total: np.ndarray) -> None:
    """Each target through a `.part` file renamed once written (a failed run leaves no half-written file)."""
    targets = []
    if out is not None:
        text = "".join(json.dumps(record) + "\n" for record in records).encode()
        targets.append((Path(out), lambda handle: handle.write(text)))
    if scores_out is not None:
        targets.append((Path(scores_out), lambda handle: np.save(handle, total)))
    for path, write in targets:
        part = path.with_name(path.name + ".part")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(part, "wb") as handle:
                write(handle)
            part.replace(path)
        except OSError as error:
            part.unlink(missing_ok=True)
            raise TributaryError(
                f"cannot write {path} ({error.strerror or type(error).__name__}); give a path in a directory you "
                "can write"
            ) from None
