"""`tributary query`: attribute a file of queries against a complete store."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.config import JobConfig
from engine.data.rows import Row, file_fingerprint, read_rows
from engine.errors import TributaryError
from engine.indexing.compute import gradient_pass
from engine.indexing.job import ModelContext, field_names, load_model_context
from engine.projection import ProjectionSpec
from engine.query.scoring import score_store, top_k_with_scores
from engine.spectral.core import score_block_per_module, transform_queries
from engine.spectral.methods import method_from_config
from engine.store import GradientStore
from engine.store.location import redact

log = logging.getLogger(__name__)
SNIPPET_CHARS = 200


def open_complete_store(path: str) -> GradientStore:
    store = GradientStore.open(path)
    manifest = store.manifest
    if not manifest.get("complete"):
        done = len(manifest.get("completed_shards", []))
        raise TributaryError(
            f"store {redact(path)} is incomplete ({done} of {len(store.shards())} shards done); "
            "run `tributary index` with the same config to finish it"
        )
    return store


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


def query_gradients(context: ModelContext, rows: list[Row], source: str) -> np.ndarray:
    tokenized = context.tokenize(rows, source)
    return gradient_pass(context, tokenized, with_covariance=False).grads


def _snippets(config: JobConfig, store: GradientStore) -> list[str] | None:
    train = Path(config.data.train)
    if not train.is_file() or file_fingerprint(train) != store.manifest["fingerprints"].get("dataset"):
        log.warning("data.train is missing or differs from the indexed data; results carry ids, no snippets")
        return None
    return [row.display[:SNIPPET_CHARS] for row in read_rows(train, field_names(config))]


def _result_rows(queries: list[Row], result: "QueryResult", ids: list[str], snippets: list[str] | None,
                 method: str, module_names: list[str]):
    for q, query in enumerate(queries):
        entries = []
        for rank, (index, score) in enumerate(zip(result.top_indices[q], result.top_scores[q]), start=1):
            entry = {"rank": rank, "index": int(index), "id": ids[index], "score": float(score)}
            if snippets is not None:
                entry["snippet"] = snippets[index]
            if result.per_module is not None:
                entry["per_module"] = {name: float(result.per_module[q][rank - 1, m])
                                       for m, name in enumerate(module_names)}
            entries.append(entry)
        record = {"query": q, "id": query.id, "method": method, "top_k": entries}
        if query.text is not None:
            record["text"] = query.text
        else:
            record.update(prompt=query.prompt, completion=query.completion)
        yield record


@dataclass
class QueryResult:
    top_indices: np.ndarray  # (Q, k), best first, ties to the lower training index
    top_scores: np.ndarray  # (Q, k)
    total: np.ndarray | None  # (Q, N) full scores; on a cluster only when --scores-out asks for them
    per_module: list[np.ndarray] | None = None  # per query (k, M): each module's share of the top-k scores


def _per_module_top(store: GradientStore, transformed: np.ndarray, top_indices: np.ndarray, spec: ProjectionSpec,
                    method) -> list[np.ndarray]:
    """Per-module scores of the top-k rows only, read back from the store (cheap for any N)."""
    out = []
    for q, indices in enumerate(top_indices):
        rows = store.read_row_selection(indices)
        out.append(score_block_per_module(transformed[q:q + 1], rows, spec, method)[:, 0, :].T)
    return out


def _score(config: JobConfig, store: GradientStore, transformed: np.ndarray, method, k: int,
           need_full: bool) -> QueryResult:
    if config.cluster is None:
        total = score_store(store, transformed, method)
        indices, values = top_k_with_scores(total, k)
        return QueryResult(indices, values, total)
    from engine.distributed.cluster import connect, pool_size
    from engine.distributed.scoring import score_on_cluster

    connect(config.cluster)
    indices, values, total = score_on_cluster(store, transformed, method.normalise, k, need_full, config.cluster,
                                              pool_size(config.cluster))
    return QueryResult(indices, values, total)


def store_spec(store: GradientStore) -> ProjectionSpec:
    return ProjectionSpec.from_dict(store.manifest["projection"])


def _check_outputs(out: str | None, scores_out: str | None) -> None:
    for option, target in (("--out", out), ("--scores-out", scores_out)):
        if target is not None and Path(target).is_dir():
            raise TributaryError(f"{option} {target} is a directory; give a file path")
    if out is not None and scores_out is not None and Path(out).resolve() == Path(scores_out).resolve():
        raise TributaryError(f"--out and --scores-out are both {out}; give two different files")


def run_query(config: JobConfig, queries_path: str, k: int, out: str | None = None,
              scores_out: str | None = None, per_module: bool = False) -> QueryResult:
    """Score every query against every stored row; write results and scores only once all succeeded.

    Queries are scored as one batch, so each stored chunk is read once for all of them; with a
    `cluster` section the rows are split over Ray actors that each return their top-k.
    """
    if k <= 0:
        raise TributaryError(f"--top-k must be positive, got {k}")
    _check_outputs(out, scores_out)
    store = open_complete_store(config.store.path)
    queries = read_rows(queries_path, field_names(config), what="queries file")  # before the model loads
    spec = store_spec(store)
    context = load_model_context(config)
    check_compatible(store, context, config)
    method = method_from_config(config.method)
    factors = store.read_factors() if method.spectral is not None else None
    transformed = transform_queries(query_gradients(context, queries, queries_path), spec, method, factors)
    result = _score(config, store, transformed, method, k, need_full=scores_out is not None)
    if per_module:
        result.per_module = _per_module_top(store, transformed, result.top_indices, spec, method)
    writes = []
    if out is not None:
        records = _result_rows(queries, result, store.ids(), _snippets(config, store), method.name,
                               [m.name for m in spec.modules])
        text = "".join(json.dumps(record) + "\n" for record in records).encode()
        writes.append((Path(out), lambda handle: handle.write(text)))
    if scores_out is not None:
        writes.append((Path(scores_out), lambda handle: np.save(handle, result.total)))
    _atomic_write_all(writes)
    return result


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
