"""`tributary query`: attribute a file of queries against a complete store."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from engine.config import JobConfig
from engine.data.rows import Row, file_fingerprint, read_rows
from engine.errors import TributaryError
from engine.indexing.compute import gradient_pass
from engine.indexing.job import ModelContext, field_names, load_model_context
from engine.projection import ProjectionSpec, build_projection
from engine.query.scoring import Scores, score_store, top_k
from engine.spectral.core import transform_queries
from engine.spectral.methods import method_from_config
from engine.store import GradientStore
from engine.store.compatibility import mismatches

log = logging.getLogger(__name__)
SNIPPET_CHARS = 200


def open_complete_store(path: str) -> GradientStore:
    store = GradientStore.open(path)
    manifest = store.manifest
    if not manifest.get("complete"):
        done = len(manifest.get("completed_shards", []))
        raise TributaryError(
            f"store {path} is incomplete ({done} of {len(store.shards())} shards done); "
            "run `tributary index` with the same config to finish it"
        )
    return store


def check_compatible(store: GradientStore, context: ModelContext, config: JobConfig) -> None:
    stored = store.manifest["fingerprints"]
    requested = build_projection(config.projection.dim, config.projection.seed, config.projection.kind,
                                 [(m.name, m.d_in, m.d_out) for m in context.spec.modules])
    current = dict(context.fingerprints, projection=requested.fingerprint())
    different = mismatches(stored, current, keys=("model", "tokenizer", "projection"))
    if different:
        raise TributaryError(
            f"store {store.path} was built with a different " + ", ".join(different)
            + "; query with the config the store was indexed with, or re-index"
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


def _result_rows(queries: list[Row], scores: Scores, order: np.ndarray, ids: list[str],
                 snippets: list[str] | None, method: str, module_names: list[str]):
    for q, query in enumerate(queries):
        entries = []
        for rank, index in enumerate(order[q], start=1):
            entry = {"rank": rank, "index": int(index), "id": ids[index], "score": float(scores.total[q, index])}
            if snippets is not None:
                entry["snippet"] = snippets[index]
            if scores.per_module is not None:
                entry["per_module"] = {name: float(scores.per_module[m, q, index])
                                       for m, name in enumerate(module_names)}
            entries.append(entry)
        record = {"query": q, "id": query.id, "method": method, "top_k": entries}
        if query.text is not None:
            record["text"] = query.text
        else:
            record.update(prompt=query.prompt, completion=query.completion)
        yield record


def run_query(config: JobConfig, queries_path: str, k: int, out: str | None = None,
              scores_out: str | None = None, per_module: bool = False) -> Scores:
    if k <= 0:
        raise TributaryError(f"--top-k must be positive, got {k}")
    store = open_complete_store(config.store.path)
    spec = ProjectionSpec.from_dict(store.manifest["projection"])
    context = load_model_context(config, spec=spec)
    check_compatible(store, context, config)
    queries = read_rows(queries_path, field_names(config), what="queries file")
    method = method_from_config(config.method)
    factors = store.read_factors() if method.spectral is not None else None
    transformed = transform_queries(query_gradients(context, queries, queries_path), spec, method, factors)
    scores = score_store(store, transformed, method, spec, per_module=per_module)
    order = top_k(scores.total, k)
    if scores_out is not None:
        _atomic_write(Path(scores_out), lambda handle: np.save(handle, scores.total))
    if out is not None:
        records = _result_rows(queries, scores, order, store.ids(), _snippets(config, store), method.name,
                               [m.name for m in spec.modules])
        text = "".join(json.dumps(record) + "\n" for record in records)
        _atomic_write(Path(out), lambda handle: handle.write(text.encode()))
    return scores


def _atomic_write(path: Path, write) -> None:
    """Write next to the target and rename, so a failure never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as handle:
        write(handle)
    tmp.replace(path)
