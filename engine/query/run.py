"""`tributary query`: attribute a file of queries against a complete store."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from engine.ann.index import AnnIndex
from engine.config import JobConfig, QueryOptions
from engine.data.rows import field_names, read_rows
from engine.errors import TributaryError
from engine.gradients.context import ModelContext, load_model_context
from engine.model.placement import check_placement, check_zero3_query
from engine.query.attributor import (
    Attributor,
    QueryGroup,
    ScanFactory,
    check_method,
    final_model,
    open_complete_store,
)
from engine.query.generate import PromptRow, read_prompts
from engine.query.records import Query
from engine.query.scoring import QueryResult
from engine.spectral.methods import method_from_config
from engine.store.location import redact


def _load_queries(
    attributor: Attributor, queries_path: str, options: QueryOptions, prompts: list[PromptRow] | None = None
) -> list[Query]:
    if options.generation is not None:
        if prompts is None:
            raise RuntimeError("generated queries need the prompts read before the model loads")
        return attributor.generated_queries(prompts, options.generation, queries_path)
    rows = read_rows(queries_path, field_names(attributor.config), what="queries file")
    return attributor.queries_from_rows(rows, queries_path)


def _check_outputs(out: str | None, scores_out: str | None) -> None:
    for option, target in (("--out", out), ("--scores-out", scores_out)):
        if target is not None and Path(target).is_dir():
            raise TributaryError(f"{option} {target} is a directory; give a file path")
    if out is not None and scores_out is not None and Path(out).resolve() == Path(scores_out).resolve():
        raise TributaryError(f"--out and --scores-out are both {out}; give two different files")


def run_query(
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
    that each return their top-k (engine.runner.run_query passes it).
    """
    if k <= 0:
        raise TributaryError(f"--top-k must be positive, got {k}")
    options = replace(options, k=k) if options is not None else QueryOptions(k=k, per_module=per_module)
    _check_outputs(out, scores_out)
    opened = open_complete_store(config.store.path)
    check_method(opened, method_from_config(config.method), options.per_token)
    prompts = None
    if options.generation is not None:  # read (and validate) the queries file before the model loads
        prompts = read_prompts(queries_path, config.data.prompt_field, config.data.id_field)
    else:
        read_rows(queries_path, field_names(config), what="queries file")
    if options.approximate and scores_out is None and method_from_config(config.method).build_terms is None:
        AnnIndex(
            config.store.path, final_model(config, opened)[1]
        )  # a missing or stale index: refused before the model loads
    check_zero3_query(config, options)
    if config.placement.kind == "zero3" and load_context is None:
        raise TributaryError(
            "placement.kind zero3: query gradients come from a group of ranks; run the query through "
            "engine.runner.run_query (as `tributary query` does), with a cluster section"
        )
    check_placement(config)  # query gradients are computed with the config's placement
    scan = None if scans is None else scans(final_model(config, opened)[1])
    attributor = Attributor.load(config, opened, scan, load_context or load_model_context)
    queries = _load_queries(attributor, queries_path, options, prompts)
    group = QueryGroup(queries, options, attributor.method())
    (result,) = attributor.attribute([group], need_full=scores_out is not None)
    records = result.written_records()
    writes = []
    if out is not None:
        text = "".join(json.dumps(record) + "\n" for record in records).encode()
        writes.append((Path(out), lambda handle: handle.write(text)))
    if scores_out is not None:
        total = result.total
        if total is None:
            raise RuntimeError("the attributor returned no full scores although --scores-out asked for them")
        writes.append((Path(scores_out), lambda handle: np.save(handle, total)))
    if report is not None:
        from engine.report.html import render_html_report

        page = render_html_report(records, run_settings(config, len(attributor.ids), options)).encode()
        writes.append((Path(report), lambda handle: handle.write(page)))
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


def _atomic_write_all(writes) -> None:
    """Write every target to a `.part` file first and rename them all only when every write succeeded."""
    parts = []
    try:
        for path, write in writes:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".part")
                parts.append(tmp)
                with open(tmp, "wb") as handle:
                    write(handle)
            except OSError as error:
                raise TributaryError(
                    f"cannot write {path} ({error.strerror or type(error).__name__}); give a path in a directory "
                    "you can write"
                ) from None
        for (path, _), tmp in zip(writes, parts):
            tmp.replace(path)
    finally:
        for tmp in parts:
            tmp.unlink(missing_ok=True)
