"""`tributary query`: attribute a file of queries against a complete store."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.config import JobConfig
from engine.data.rows import file_fingerprint, read_rows
from engine.errors import TributaryError
from engine.indexing.compute import gradient_pass, token_gradients
from engine.indexing.job import ModelContext, field_names, load_model_context
from engine.data.tokenize import TokenizedRow
from engine.projection import ProjectionSpec
from engine.query.generate import GenerationSettings, generate, read_prompts, token_pieces
from engine.query.scoring import score_store, top_k_with_scores
from engine.spectral.core import score_block, transform_queries
from engine.spectral.methods import method_from_config
from engine.store import GradientStore
from engine.store.location import redact
from engine.store.run_store import RunStore, is_run_store
from engine.query.resources import StoreResources
from engine.training_run.configs import checkpoint_config
from engine.training_run.resolve import require_schedule

log = logging.getLogger(__name__)
SNIPPET_CHARS = 200


def open_complete_store(path: str) -> GradientStore | RunStore:
    if is_run_store(path):
        run = RunStore.open(path)
        if not run.manifest.get("complete"):
            raise TributaryError(f"training-run store {redact(path)} is incomplete; run `tributary index` with the "
                                 "same config to finish it")
        return run
    store = GradientStore.open(path)
    manifest = store.manifest
    if not manifest.get("complete"):
        done = len(manifest.get("completed_shards", []))
        raise TributaryError(
            f"store {redact(path)} is incomplete ({done} of {len(store.shards())} shards done); "
            "run `tributary index` with the same config to finish it"
        )
    return store


def final_model(config: JobConfig, opened: GradientStore | RunStore) -> tuple[JobConfig, GradientStore]:
    """(config of the final model, its store): a training run's last checkpoint and its sub-store."""
    if isinstance(opened, GradientStore):
        return config, opened
    plan = opened.plan
    final = plan.final
    dataset = plan.datasets[plan.segments[final.segment].dataset]
    return checkpoint_config(config, final.path, dataset, opened.checkpoint_path(final.name)), \
        opened.checkpoint(final.name)


def _check_method(config: JobConfig, opened: GradientStore | RunStore, method, options) -> None:
    """Refuse, before any model loads, a method the store cannot serve or an option the method lacks."""
    if isinstance(opened, RunStore):
        require_schedule(opened.plan, method.name)
    elif method.name == "fast_source":
        raise TributaryError("method fast_source needs a training-run store indexed with training_run.averaged: true")
    per_token_ok = method.build_terms is None or (method.spectral is not None and not isinstance(opened, RunStore))
    if options.per_token and not per_token_ok:
        raise TributaryError(f"--per-token is available for grad_dot, grad_cos, if and one-segment source on a "
                             f"single-checkpoint store, not for method {method.name}; drop --per-token")


def _projection_differences(stored: dict, config: JobConfig) -> list[str]:
    wanted = config.projection
    return [f"projection.{key} (store: {stored.get(key)!r}, config: {getattr(wanted, key)!r})"
            for key in ("dim", "seed", "kind") if stored.get(key) != getattr(wanted, key)]


def check_compatible(store: GradientStore, context: ModelContext, config: JobConfig) -> None:
    """Refuse a store indexed with another model, tokenizer or projection, naming what differs.

    `context` is built from `config` alone (its own projection spec), so every difference shows up
    here, with the store's and the config's values side by side.
    """
    manifest = store.manifest
    stored = manifest["fingerprints"]
    current = dict(context.fingerprints, projection=context.spec.fingerprint())
    different = []
    if stored.get("model") != current["model"]:
        indexed = manifest.get("model", {})
        keys = ("path", "adapter", "modules", "include_bias", "dtype")
        changed = [f"model.{key} (store: {indexed.get(key)!r}, config: {getattr(config.model, key)!r})"
                   for key in keys if key in indexed and indexed.get(key) != getattr(config.model, key)]
        different.append("model: " + ("; ".join(changed) if changed else
                                      f"the weights at model.path {config.model.path} changed since indexing"))
    if stored.get("tokenizer") != current["tokenizer"]:
        different.append("tokenizer (the tokenizer at model.path differs from the indexed one)")
    if stored.get("projection") != current["projection"]:
        settings = _projection_differences(manifest.get("projection", {}), config)
        different.append("projection: " + ("; ".join(settings) if settings else
                                           "the tracked modules or their shapes differ (model.modules / "
                                           "model.include_bias)"))
    if different:
        raise TributaryError(
            f"store {redact(store.path)} was built with a different " + " and a different ".join(different)
            + ". Query with the config the store was indexed with, or re-index"
        )


def _snippets(config: JobConfig, store: GradientStore) -> list[str] | None:
    train = Path(config.data.train)
    if not train.is_file() or file_fingerprint(train) != store.manifest["fingerprints"].get("dataset"):
        log.warning("data.train is missing or differs from the indexed data; results carry ids, no snippets")
        return None
    return [row.snippet(SNIPPET_CHARS) for row in read_rows(train, field_names(config))]


@dataclass
class Query:
    """One query as attributed: its display fields and the exact tokens whose measurement is scored."""

    id: str
    row: TokenizedRow
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    generated: bool = False


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


@dataclass(frozen=True)
class QueryOptions:
    k: int = 10
    measurement: str = "logprob_sum"
    per_module: bool = False
    per_token: bool = False
    generation: GenerationSettings | None = None


def _entries(kind: str, q: int, result: QueryResult, ids: list[str], snippets: list[str] | None,
             module_names: list[str]) -> list[dict]:
    indices = result.top_indices if kind == "top" else result.bottom_indices
    scores = result.top_scores if kind == "top" else result.bottom_scores
    entries = []
    for rank, (index, score) in enumerate(zip(indices[q], scores[q]), start=1):
        entry = {"rank": rank, "index": int(index), "id": ids[index], "score": float(score)}
        if snippets is not None:
            entry["snippet"] = snippets[index]
        if result.per_module is not None:
            entry["per_module"] = {name: float(result.per_module[kind][q][rank - 1, m])
                                   for m, name in enumerate(module_names)}
        if result.per_token is not None:
            entry["per_token"] = [float(x) for x in result.per_token[kind][q][rank - 1]]
        entries.append(entry)
    return entries


def _result_rows(queries: list[Query], result: QueryResult, ids: list[str], snippets: list[str] | None,
                 method: str, module_names: list[str], options: QueryOptions, pieces: list[list[str]]):
    for q, query in enumerate(queries):
        record = {"query": q, "id": query.id, "method": method, "measurement": options.measurement,
                  "generated": query.generated, "completion_tokens": pieces[q],
                  "top_k": _entries("top", q, result, ids, snippets, module_names),
                  "bottom_k": _entries("bottom", q, result, ids, snippets, module_names)}
        if result.per_token is not None and record["top_k"]:
            record["token_scores"] = record["top_k"][0]["per_token"]
        if query.text is not None:
            record["text"] = query.text
        else:
            record.update(prompt=query.prompt, completion=query.completion)
        yield record


def _per_token(context: ModelContext, store: GradientStore, queries: list[Query], listed: dict[str, np.ndarray],
               spec: ProjectionSpec, method, factors, measurement: str) -> dict[str, list[np.ndarray]]:
    """Per listed kind ("top"/"bottom"), (k, T) per query: each listed row's score split over the
    completion tokens.

    Token t's share is the score of the gradient of token t's own term of the measurement, so the shares
    sum to the score (exactly for logprob_sum and margin; logprob_mean divides each term by T). The token
    gradients (one pass per query) serve every listed kind.
    """
    out: dict[str, list[np.ndarray]] = {kind: [] for kind in listed}
    for q, query in enumerate(queries):
        grads = token_gradients(context, query.row, measurement)
        if measurement == "logprob_mean":
            grads = grads / len(grads)
        if method.normalise:  # Grad-Cos: every share is divided by the norm of the whole query gradient
            token_side = grads / max(float(np.linalg.norm(grads.sum(axis=0))), 1e-300)
        else:
            token_side = transform_queries(grads, spec, method, factors)
        for kind, indices in listed.items():
            out[kind].append(score_block(token_side, store.read_row_selection(indices[q]), method).T)
    return out


def _score(config: JobConfig, store: GradientStore, transformed: np.ndarray, method, k: int,
           need_full: bool) -> QueryResult:
    if config.cluster is None:
        total = score_store(store, transformed, method)
        top, top_scores = top_k_with_scores(total, k)
        bottom, bottom_scores = top_k_with_scores(-total, k)
        return QueryResult(top, top_scores, bottom, -bottom_scores, total)
    from engine.distributed.cluster import connect, pool_size
    from engine.distributed.scoring import score_on_cluster

    connect(config.cluster)
    top, top_scores, bottom, bottom_scores, total = score_on_cluster(
        store, transformed, method.normalise, k, need_full, config.cluster, pool_size(config.cluster))
    return QueryResult(top, top_scores, bottom, bottom_scores, total)


def store_spec(store: GradientStore) -> ProjectionSpec:
    return ProjectionSpec.from_dict(store.manifest["projection"])


def _load_queries(config: JobConfig, context: ModelContext | None, queries_path: str,
                  options: QueryOptions, prompts=None) -> list[Query]:
    if options.generation is not None:
        generated = generate(context.model, context.tokenizer, prompts, options.generation,
                             config.data.max_length, queries_path)
        return [Query(g.prompt.id, g.row, prompt=g.prompt_text, completion=g.completion, generated=True)
                for g in generated]
    rows = read_rows(queries_path, field_names(config), what="queries file")
    tokenized = context.tokenize(rows, queries_path)
    return [Query(row.id, tok, text=row.text if row.messages is None else row.display, prompt=row.prompt,
                  completion=row.completion) for row, tok in zip(rows, tokenized)]


def _check_outputs(out: str | None, scores_out: str | None) -> None:
    for option, target in (("--out", out), ("--scores-out", scores_out)):
        if target is not None and Path(target).is_dir():
            raise TributaryError(f"{option} {target} is a directory; give a file path")
    if out is not None and scores_out is not None and Path(out).resolve() == Path(scores_out).resolve():
        raise TributaryError(f"--out and --scores-out are both {out}; give two different files")


def run_query(config: JobConfig, queries_path: str, k: int, out: str | None = None,
              scores_out: str | None = None, per_module: bool = False,
              options: QueryOptions | None = None, report: str | None = None) -> QueryResult:
    """Score every query against every stored row; write results, scores and report only once all succeeded.

    Queries are scored as one batch, so each stored chunk is read once for all of them; with a
    `cluster` section the rows are split over Ray actors that each return their top-k.
    """
    options = options or QueryOptions(k=k, per_module=per_module)
    if k <= 0:
        raise TributaryError(f"--top-k must be positive, got {k}")
    _check_outputs(out, scores_out)
    opened = open_complete_store(config.store.path)
    method = method_from_config(config.method)
    _check_method(config, opened, method, options)
    prompts = None
    if options.generation is not None:  # read (and validate) the queries file before the model loads
        prompts = read_prompts(queries_path, config.data.prompt_field, config.data.id_field)
    else:
        read_rows(queries_path, field_names(config), what="queries file")
    model_config, store = final_model(config, opened)
    spec = store_spec(store)
    context = load_model_context(model_config)
    check_compatible(store, context, model_config)
    queries = _load_queries(config, context, queries_path, options, prompts)
    resources = StoreResources(config, opened, spec, context, [q.row for q in queries], options.measurement)
    terms = method.terms(resources)
    if resources.is_single_term(terms):
        transformed = terms[0].transformed
        result = _score(config, store, transformed, method, k, need_full=scores_out is not None)
    else:
        if config.cluster is not None:
            log.warning("method %s scores several checkpoints; scoring in this process, not on the cluster",
                        method.name)
        result = QueryResult(*resources.score(terms, method, k))
    listed = {"top": result.top_indices, "bottom": result.bottom_indices}
    if options.per_module:
        result.per_module = {kind: resources.per_module(terms, rows, method) for kind, rows in listed.items()}
    if options.per_token:
        factors = store.read_factors() if method.spectral is not None else None
        result.per_token = _per_token(context, store, queries, listed, spec, method, factors, options.measurement)
    pieces = [token_pieces(context.tokenizer, q.row) for q in queries]
    ids, snippets = ((store.ids(), _snippets(config, store)) if resources.run is None
                     else (resources.ids(), resources.snippets(SNIPPET_CHARS)))
    records = list(_result_rows(queries, result, ids, snippets, method.name,
                                [m.name for m in spec.modules], options, pieces))
    writes = []
    if out is not None:
        text = "".join(json.dumps(record) + "\n" for record in records).encode()
        writes.append((Path(out), lambda handle: handle.write(text)))
    if scores_out is not None:
        writes.append((Path(scores_out), lambda handle: np.save(handle, result.total)))
    if report is not None:
        from engine.report.html import render_html_report

        page = render_html_report(records, run_settings(config, store, options)).encode()
        writes.append((Path(report), lambda handle: handle.write(page)))
    _atomic_write_all(writes)
    result.records = records
    return result


def run_settings(config: JobConfig, store: GradientStore, options: QueryOptions) -> dict:
    settings = {"model": config.model.path, "adapter": config.model.adapter, "method": config.method.name,
                "damping": config.method.damping, "projection dim": config.projection.dim,
                "curvature": config.curvature.strategy, "fisher": config.curvature.fisher,
                "store": redact(config.store.path), "training rows": store.rows, "measurement": options.measurement}
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
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".part")
            parts.append(tmp)
            with open(tmp, "wb") as handle:
                write(handle)
        for (path, _), tmp in zip(writes, parts):
            tmp.replace(path)
    finally:
        for tmp in parts:
            tmp.unlink(missing_ok=True)


def _atomic_write(path: Path, write) -> None:
    """Write next to the target and rename, so a failure never leaves a half-written file."""
    _atomic_write_all([(path, write)])
