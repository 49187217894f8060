"""Load once, score many: everything a query needs, and the scoring pass that answers a batch of them.

`Attributor.load` opens the store (read-only), loads the model with its tracked modules, checks that the
two belong together, and keeps the training ids, snippets and curvature factors. `Attributor.attribute`
answers groups of queries (each group with its own method, measurement and k) with one gradient pass per
measurement and one read of the store per normalisation (Grad-Cos or not), whatever the number of groups.
`tributary query` builds one per run; every replica of `tributary serve` builds one at start-up and
scores each batch of requests with it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from engine.config import JobConfig, with_method_name
from engine.data.rows import Row, file_fingerprint, read_rows
from engine.data.tokenize import tokenize_rows
from engine.errors import TributaryError
from engine.indexing.compute import gradient_pass
from engine.indexing.job import ModelContext, field_names, load_model_context
from engine.projection import ProjectionSpec
from engine.query.generate import GenerationSettings, PromptRow, generate, per_token_rows, token_pieces
from engine.query.records import Query, result_records
from engine.query.scoring import QueryResult, rank_store
from engine.spectral.core import score_block, score_block_per_module, transform_queries
from engine.spectral.methods import Method, method_from_config
from engine.store import GradientStore
from engine.store.location import redact

log = logging.getLogger(__name__)
SNIPPET_CHARS = 200

# One scoring pass: (transformed queries (Q, D), unit-normalise stored rows?, k, keep full scores?) → ranks.
Scan = Callable[[np.ndarray, bool, int, bool], QueryResult]


def open_complete_store(path: str) -> GradientStore:
    store = GradientStore.open(path)  # read-only: nothing here writes a store
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


def store_spec(store: GradientStore) -> ProjectionSpec:
    return ProjectionSpec.from_dict(store.manifest["projection"])


def _snippets(config: JobConfig, store: GradientStore) -> list[str] | None:
    train = Path(config.data.train)
    if not train.is_file() or file_fingerprint(train) != store.manifest["fingerprints"].get("dataset"):
        log.warning("data.train is missing or differs from the indexed data; results carry ids, no snippets")
        return None
    return [row.display[:SNIPPET_CHARS] for row in read_rows(train, field_names(config))]


def default_scan(config: JobConfig, store: GradientStore) -> Scan:
    """In this process, or, with a `cluster` section, on row-range actors started for each pass."""
    if config.cluster is None:
        return lambda transformed, normalise, k, full: rank_store(store, transformed, normalise, k, full)
    cluster = config.cluster

    def on_cluster(transformed: np.ndarray, normalise: bool, k: int, full: bool) -> QueryResult:
        from engine.distributed.cluster import connect, pool_size
        from engine.distributed.scoring import score_on_cluster

        connect(cluster)
        return score_on_cluster(store, transformed, normalise, k, full, cluster, pool_size(cluster))
    return on_cluster


@dataclass(frozen=True)
class QueryOptions:
    k: int = 10
    measurement: str = "logprob_sum"
    per_module: bool = False
    per_token: bool = False
    generation: GenerationSettings | None = None


@dataclass
class QueryGroup:
    """Queries attributed with one method, measurement and k (a query file, or one request)."""

    queries: list[Query]
    options: QueryOptions
    method: Method


class Attributor:
    def __init__(self, config: JobConfig, store: GradientStore, context: ModelContext, scan: Scan | None = None):
        self.config = config
        self.store = store
        self.context = context
        self.spec = store_spec(store)
        self.ids = store.ids()
        self.snippets = _snippets(config, store)
        self.module_names = [m.name for m in self.spec.modules]
        self.scan = scan or default_scan(config, store)
        self.scoring_passes = 0  # reads of the whole store (one per `attribute` call and normalisation)
        self._factors = None
        self._methods: dict[str, Method] = {}
        if method_from_config(config.method).spectral is not None:
            self.factors()

    @classmethod
    def load(cls, config: JobConfig, store: GradientStore | None = None, scan: Scan | None = None) -> Attributor:
        """Open the store (unless given) and load the model; refuse a store built from other inputs."""
        store = store or open_complete_store(config.store.path)
        context = load_model_context(config)
        check_compatible(store, context, config)
        return cls(config, store, context, scan)

    def method(self, name: str | None = None, source: str = "method") -> Method:
        """The config's method, or the one named (validated as the config would be: an unknown name, or
        source without eta/steps, is a TributaryError)."""
        name = self.config.method.name if name is None else name
        if name not in self._methods:
            config = self.config if name == self.config.method.name else with_method_name(self.config, name, source)
            self._methods[name] = method_from_config(config.method)
        return self._methods[name]

    def factors(self) -> dict:
        """The curvature factors, read from the store the first time a method needs them."""
        if self._factors is None:
            self._factors = self.store.read_factors()
        return self._factors

    # ---- queries ----------------------------------------------------------------------------------
    def queries_from_rows(self, rows: list[Row], source: str, tokenizer=None) -> list[Query]:
        """Tokenised queries (with `tokenizer` when given: a copy another thread may use meanwhile)."""
        tokenized = tokenize_rows(rows, tokenizer or self.context.tokenizer, self.config.data.max_length, source)
        return [Query(row.id, tok, text=row.text if row.messages is None else row.display, prompt=row.prompt,
                      completion=row.completion) for row, tok in zip(rows, tokenized)]

    def generated_queries(self, prompts: list[PromptRow], settings: GenerationSettings, source: str) -> list[Query]:
        """Complete each prompt with the model; the generated token ids are what gets attributed."""
        generated = generate(self.context.model, self.context.tokenizer, prompts, settings,
                             self.config.data.max_length, source)
        return [Query(g.prompt.id, g.row, prompt=g.prompt_text, completion=g.completion, generated=True)
                for g in generated]

    # ---- scoring ----------------------------------------------------------------------------------
    def attribute(self, groups: list[QueryGroup], need_full: bool = False) -> list[QueryResult]:
        """Each group's results (with records); the store is read once per normalisation for all groups."""
        sides = self._query_sides(groups)
        results: list[QueryResult | None] = [None] * len(groups)
        for normalise in sorted({group.method.normalise for group in groups}):
            members = [i for i, group in enumerate(groups) if group.method.normalise == normalise]
            k = max(groups[i].options.k for i in members)
            ranked = self.scan(np.concatenate([sides[i] for i in members]), normalise, k, need_full)
            self.scoring_passes += 1
            start = 0
            for i in members:
                stop = start + len(groups[i].queries)
                results[i] = ranked.select(start, stop, groups[i].options.k)
                start = stop
        for group, side, result in zip(groups, sides, results):
            self._add_details(group, side, result)
        return results

    def _query_sides(self, groups: list[QueryGroup]) -> list[np.ndarray]:
        """Each group's transformed query rows; one gradient pass per measurement over all groups."""
        grads: list[np.ndarray | None] = [None] * len(groups)
        by_measurement: dict[str, list[int]] = defaultdict(list)
        for i, group in enumerate(groups):
            by_measurement[group.options.measurement].append(i)
        for measurement, members in by_measurement.items():
            rows = [query.row for i in members for query in groups[i].queries]
            stacked = gradient_pass(self.context, rows, with_covariance=False, measurement=measurement).grads
            start = 0
            for i in members:
                grads[i] = stacked[start:start + len(groups[i].queries)]
                start += len(groups[i].queries)
        return [transform_queries(g, self.spec, group.method, self._factors_for(group.method))
                for g, group in zip(grads, groups)]

    def _factors_for(self, method: Method) -> dict | None:
        return self.factors() if method.spectral is not None else None

    def _add_details(self, group: QueryGroup, side: np.ndarray, result: QueryResult) -> None:
        options, method = group.options, group.method
        listed = {"top": result.top_indices, "bottom": result.bottom_indices}
        if options.per_module:
            result.per_module = {kind: self._per_module(side, rows, method) for kind, rows in listed.items()}
        if options.per_token:
            result.per_token = {kind: self._per_token(group.queries, rows, method, options.measurement)
                                for kind, rows in listed.items()}
        pieces = [token_pieces(self.context.tokenizer, q.row) for q in group.queries]
        result.records = result_records(group.queries, result, self.ids, self.snippets, method.name,
                                        options.measurement, self.module_names, pieces)

    def _per_module(self, transformed: np.ndarray, indices: np.ndarray, method: Method) -> list[np.ndarray]:
        """Per-module scores of the listed rows only, read back from the store (cheap for any N)."""
        return [score_block_per_module(transformed[q:q + 1], self.store.read_row_selection(rows), self.spec,
                                       method)[:, 0, :].T
                for q, rows in enumerate(indices)]

    def _per_token(self, queries: list[Query], indices: np.ndarray, method: Method,
                   measurement: str) -> list[np.ndarray]:
        """(k, T) per query: the score of each listed row split over the completion tokens.

        Token t's share is the score of the gradient of token t's own term of the measurement, so the shares
        sum to the score (exactly for logprob_sum and margin; logprob_mean divides each term by T).
        """
        out = []
        for q, query in enumerate(queries):
            token_rows = per_token_rows(query.row)
            grads = gradient_pass(self.context, token_rows, with_covariance=False, measurement=measurement).grads
            if measurement == "logprob_mean":
                grads = grads / len(token_rows)
            if method.normalise:  # Grad-Cos: every share is divided by the norm of the whole query gradient
                token_side = grads / max(float(np.linalg.norm(grads.sum(axis=0))), 1e-300)
            else:
                token_side = transform_queries(grads, self.spec, method, self._factors_for(method))
            out.append(score_block(token_side, self.store.read_row_selection(indices[q]), method).T)
        return out
