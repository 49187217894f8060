"""`tributary query`: attribute a file of queries against a complete store."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engine.config import JobConfig, QueryOptions
from engine.errors import TributaryError
from engine.gradients.context import ModelContext, load_model_context
from engine.model.placement import check_placement
from engine.query.attributor import Attributor, QueryGroup, ScanFactory
from engine.query.plan import QueryOutputs, QueryPlan, resolve_query_plan, with_top_k
from engine.query.records import Query
from engine.query.scoring import QueryResult
from engine.store.location import redact
from engine.store.space import is_disk_full, out_of_space


def _queries(attributor: Attributor, plan: QueryPlan) -> list[Query]:
    if plan.prompts is not None:
        generation = plan.options.generation
        if generation is None:
            raise RuntimeError("a plan with prompts comes from options with generation settings")
        return attributor.generated_queries(plan.prompts, generation, plan.queries_path)
    if plan.rows is None:
        raise RuntimeError("a plan without prompts holds the queries file's rows")
    return attributor.queries_from_rows(plan.rows, plan.queries_path)


def plan_and_score(
    config: JobConfig,
    queries_path: str,
    k: int,
    out: str | None = None,
    scores_out: str | None = None,
    per_module: bool = False,
    options: QueryOptions | None = None,
    report: str | None = None,
    scans: ScanFactory | None = None,
    load_context: Callable[[JobConfig], ModelContext] | None = None,
) -> QueryResult:
    """Score every query against every stored row; write results, scores and report only once all succeeded.

    Queries are scored as one batch, so each stored chunk is read once for all of them; with a
    `cluster` section, `scans` gives the scan of the final model's store that splits the rows over Ray actors
    that each return their top-k (engine.local_or_ray.run_query passes it). Everything that can be checked before
    the model loads is resolved once, into a QueryPlan (engine.query.plan); the rest only consumes it.
    """
    if k <= 0:
        raise TributaryError(f"--top-k must be positive, got {k}")
    plan = resolve_query_plan(
        config, queries_path, with_top_k(options, k, per_module), QueryOutputs(out, scores_out, report)
    )
    return execute_query_plan(plan, scans, load_context)


def execute_query_plan(
    plan: QueryPlan,
    scans: ScanFactory | None = None,
    load_context: Callable[[JobConfig], ModelContext] | None = None,
) -> QueryResult:
    """Load the final model, score the plan's queries and write its outputs (see plan_and_score)."""
    config, options, outputs = plan.config, plan.options, plan.outputs
    if config.placement.kind == "zero3" and load_context is None:
        raise TributaryError(
            "placement.kind zero3: query gradients come from a group of ranks; run the query through "
            "engine.local_or_ray.run_query (as `tributary query` does), with a cluster section"
        )
    check_placement(config)  # query gradients are computed with the config's placement
    scan = None if scans is None else scans(plan.store)
    attributor = Attributor.load(
        config,
        plan.opened,
        scan,
        load_context or load_model_context,
        final=(plan.final_config, plan.store),
        method=plan.method,
    )
    queries = _queries(attributor, plan)
    group = QueryGroup(queries, options, plan.method)
    (result,) = attributor.attribute([group], need_full=plan.need_full)
    records = result.written_records()
    writes = []
    if outputs.out is not None:
        text = "".join(json.dumps(record) + "\n" for record in records).encode()
        writes.append((Path(outputs.out), len(text), lambda handle: handle.write(text)))
    if outputs.scores_out is not None:
        total = result.total
        if total is None:
            raise RuntimeError("the attributor returned no full scores although --scores-out asked for them")
        writes.append(
            (Path(outputs.scores_out), NPY_HEADER_BYTES + total.nbytes, lambda handle: np.save(handle, total))
        )
    if outputs.report is not None:
        from engine.report.html import render_html_report

        page = render_html_report(records, run_settings(config, len(attributor.ids), options)).encode()
        writes.append((Path(outputs.report), len(page), lambda handle: handle.write(page)))
    _atomic_write_all(writes)
    return result


def run_settings(config: JobConfig, training_rows: int, options: QueryOptions) -> dict:
    settings = {
        "model": config.model.path,
        "adapter": config.model.adapter,
        "method": config.method.name,
        "damping": config.method.damping,
        "projection dim": config.projection.dim,
        "curvature": config.curvature.strategy,
        "fisher": config.curvature.fisher,
        "store": redact(config.store.path),
        "training rows": training_rows,
        "measurement": options.measurement,
    }
    if config.method.name == "source":
        settings.update(eta=config.method.eta, steps=config.method.steps)
    if options.generation is not None:
        settings.update({f"generation {key}": value for key, value in options.generation.describe().items()})
    return settings


NPY_HEADER_BYTES = 128  # np.save's header for a 2-D float64 array, padded to 64 bytes


def _atomic_write_all(writes: list[tuple[Path, int, Callable]]) -> None:
    """Write every target (path, its size in bytes, the writer) to a `.part` file first and rename them all
    only when every write succeeded: a failure leaves no output and no `.part` file behind."""
    parts = []
    try:
        for path, _, write in writes:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".part")
                parts.append(tmp)
                with open(tmp, "wb") as handle:
                    write(handle)
            except OSError as error:
                if is_disk_full(error):  # every output is written again: all of them need the space
                    raise out_of_space(
                        str(path), error, sum(size for _, size, _ in writes), "run the query again"
                    ) from None
                raise TributaryError(
                    f"cannot write {path} ({error.strerror or type(error).__name__}); give a path in a directory "
                    "you can write"
                ) from None
        for (path, _, _), tmp in zip(writes, parts):
            tmp.replace(path)
    finally:
        for tmp in parts:
            tmp.unlink(missing_ok=True)
