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
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.ann.index import AnnIndex
from engine.config import GenerationSettings, JobConfig, QueryOptions, with_method_name
from engine.config.capabilities import Feature, check_capability
from engine.data.rows import Row
from engine.data.tokenize import tokenize_rows
from engine.errors import TributaryError
from engine.gradients.context import ModelContext, load_model_context, with_stored_projection
from engine.gradients.passes import token_gradients
from engine.projection import ProjectionSpec
from engine.query.approximate import rank_approximate
from engine.query.generate import PromptRow, generate, token_pieces
from engine.query.records import Query, result_records
from engine.query.resources import StoreResources
from engine.query.scoring import QueryResult, rank_store, without_rows
from engine.spectral.core import QueryTerm, score_block, transform_queries
from engine.spectral.methods import Method, method_from_config
from engine.store import GradientStore
from engine.store.budget import budgeted_context
from engine.store.identity import StoreChanged, StoreIdentity, check_unchanged, identity_of
from engine.store.location import redact
from engine.store.run_store import RunStore, is_run_store

log = logging.getLogger(__name__)
SNIPPET_CHARS = 200

# One scoring pass: (transformed queries (Q, D), unit-normalise stored rows?, k, keep full scores?) → ranks.
Scan = Callable[[np.ndarray, bool, int, bool], QueryResult]
# The scan of the final model's store, for a config with a `cluster` section (engine.local_or_ray makes one).
ScanFactory = Callable[[GradientStore], Scan]


def open_complete_store(path: str) -> GradientStore | RunStore:
    """A complete store (read-only: nothing here writes one): a single-checkpoint store or a training run's."""
    if is_run_store(path):
        run = RunStore.open(path)
        if not run.manifest.complete:
            raise TributaryError(
                f"training-run store {redact(path)} is incomplete; run `tributary index` with the "
                "same config to finish it"
            )
        return run
    store = GradientStore.open(path)
    if not store.manifest.complete:
        done = len(store.manifest.completed_shards)
        raise TributaryError(
            f"store {redact(path)} is incomplete ({done} of {len(store.shards())} shards done); "
            "run `tributary index` with the same config to finish it"
        )
    return store


def final_model(config: JobConfig, opened: GradientStore | RunStore) -> tuple[JobConfig, GradientStore]:
    """(config of the final model, its store): a training run's last checkpoint and its sub-store; a
    single-checkpoint store's own."""
    return opened.final_config(config), opened.final_store()


def check_method(
    config: JobConfig, opened: GradientStore | RunStore, method: Method, features: tuple[Feature, ...] = ()
) -> None:
    """Refuse, before any model loads, a method the store or the placement cannot serve or a feature they lack
    (engine.config.capabilities), or a training run without the schedule the method needs."""
    check_capability(method.name, config.placement.kind, opened.kind, features)
    opened.check_schedule(method.name)


def _projection_differences(stored: ProjectionSpec, config: JobConfig) -> list[str]:
    wanted = config.projection
    return [
        f"projection.{key} (store: {getattr(stored, key)!r}, config: {getattr(wanted, key)!r})"
        for key in ("dim", "seed", "kind", "fit_rows", "top", "fit")
        if getattr(stored, key) != getattr(wanted, key)
    ]


def check_compatible(store: GradientStore, context: ModelContext, config: JobConfig) -> None:
    """Refuse a store indexed with another model, tokenizer or projection, naming what differs.

    `context` is built from `config` alone (its own projection spec), so every difference shows up
    here, with the store's and the config's values side by side.
    """
    manifest = store.manifest
    stored = manifest.fingerprints
    current = dict(context.fingerprints, projection=context.spec.fingerprint())
    different = []
    if stored.model != current["model"]:
        indexed = manifest.model
        keys = ("path", "adapter", "modules", "include_bias", "dtype")
        changed = [
            f"model.{key} (store: {indexed.get(key)!r}, config: {getattr(config.model, key)!r})"
            for key in keys
            if key in indexed and indexed.get(key) != getattr(config.model, key)
        ]
        different.append(
            "model: "
            + (
                "; ".join(changed)
                if changed
                else f"the weights at model.path {config.model.path} changed since indexing"
            )
        )
    if stored.tokenizer != current["tokenizer"]:
        different.append("tokenizer (the tokenizer at model.path differs from the indexed one)")
    if stored.projection != current["projection"]:
        settings = _projection_differences(manifest.projection, config)
        different.append(
            "projection: "
            + (
                "; ".join(settings)
                if settings
                else "the tracked modules or their shapes differ (model.modules / model.include_bias)"
            )
        )
    if different:
        raise TributaryError(
            f"store {redact(store.path)} was built with a different "
            + " and a different ".join(different)
            + ". Query with the config the store was indexed with, or re-index"
        )


def store_spec(store: GradientStore) -> ProjectionSpec:
    return store.manifest.projection


def local_scan(config: JobConfig, store: GradientStore) -> Scan:
    """In this process. A config with a `cluster` section scores there instead, with the scan that engine.local_or_ray
    (`tributary query`) or the service hands in."""
    if config.cluster is not None:
        raise TributaryError(
            "the config has a `cluster` section, which this entry point does not start; query through "
            "engine.local_or_ray.run_query (as `tributary query` does), or drop the cluster section"
        )
    return lambda transformed, normalise, k, full: rank_store(store, transformed, normalise, k, full)


@dataclass
class QueryGroup:
    """Queries attributed with one method, measurement and k (a query file, or one request)."""

    queries: list[Query]
    options: QueryOptions
    method: Method


def _require_finite_queries(queries: list[Query], terms: list[QueryTerm]) -> None:
    """A query whose gradient is NaN/inf would score every row NaN: refuse it, by id."""
    for term in terms:
        bad = np.flatnonzero(~np.isfinite(term.transformed).all(axis=1))
        if len(bad):
            names = ", ".join(f'"{queries[q].id}"' for q in bad[:5])
            raise TributaryError(
                f"query {names}: its gradient is not finite (NaN/inf), so it has no scores; the model overflows or "
                "holds NaN weights on this query: check the query, model.path and model.dtype"
            )


class Attributor:
    """`opened` is the store as opened (a training run's, or a single-checkpoint one); `store` is the final
    model's store, which the single-term methods scan and the model context matches."""

    def __init__(
        self,
        config: JobConfig,
        opened: GradientStore | RunStore,
        context: ModelContext,
        scan: Scan | None = None,
        final_store: GradientStore | None = None,
        method: Method | None = None,
    ):
        """`final_store` and `method`: the final model's store and the config's method when already resolved
        (engine.query.plan), so that neither is worked out twice."""
        self.config = config
        self.opened = opened
        self.store = final_model(config, opened)[1] if final_store is None else final_store
        self.context = context
        self.spec = store_spec(self.store)
        self._shared: dict = {}  # stores and factors the methods read, kept across batches
        rows = self._resources([], "logprob_sum")
        self.ids = rows.ids()
        self.snippets = rows.snippets(SNIPPET_CHARS)
        self.module_names = [m.name for m in self.spec.modules]
        self.scan = scan or local_scan(config, self.store)
        self.scoring_passes = 0  # reads of the whole store (one per `attribute` call and normalisation)
        # rows the index skipped for non-finite values: stored as zeros and left out of every ranking
        self.skipped = np.array([row.row for row in self.store.manifest.skipped], dtype=np.int64)
        self._methods: dict[str, Method] = {} if method is None else {config.method.name: method}
        self._ann: AnnIndex | None = None
        # what was loaded: the store as opened and, in a training run, the final model's sub-store it scans
        self._loaded: dict[str, StoreIdentity] = {s.path: identity_of(s.manifest) for s in (opened, self.store)}
        if (method or method_from_config(config.method)).spectral is not None:
            self.factors()
        self.check_store_unchanged()  # ids, snippets and factors were all read from the store as opened

    @classmethod
    def load(
        cls,
        config: JobConfig,
        opened: GradientStore | RunStore | None = None,
        scan: Scan | None = None,
        load_context: Callable[[JobConfig], ModelContext] = load_model_context,
        final: tuple[JobConfig, GradientStore] | None = None,
        method: Method | None = None,
    ) -> Attributor:
        """Open the store (unless given) and load the final model (`load_context`: in this process, or for zero3
        on a group of ranks); refuse a store built from other inputs. `final` (the final model's config and
        store) and `method`: as already resolved by engine.query.plan, when given."""
        opened = opened or open_complete_store(config.store.path)
        model_config, store = final_model(config, opened) if final is None else final
        context = budgeted_context(model_config, load_context(model_config))
        check_compatible(store, context, model_config)
        return cls(config, opened, with_stored_projection(context, store.read_projection), scan, store, method)

    def _resources(self, rows, measurement: str) -> StoreResources:
        return StoreResources(self.config, self.opened, self.spec, self.context, rows, measurement, shared=self._shared)

    def method(self, name: str | None = None, source: str = "method") -> Method:
        """The config's method, or the one named (validated as the config would be: an unknown name,
        source without eta/steps, or a method the store cannot serve is a TributaryError)."""
        name = self.config.method.name if name is None else name
        if name not in self._methods:
            config = self.config if name == self.config.method.name else with_method_name(self.config, name, source)
            method = method_from_config(config.method)
            check_method(self.config, self.opened, method)
            self._methods[name] = method
        return self._methods[name]

    def factors(self) -> dict:
        """The final model's curvature factors, read the first time a method needs them and kept in the cache
        the methods' own reads share."""
        resources = self._resources([], "logprob_sum")
        return resources.factors(resources.plan.final.key)

    def ann_index(self) -> AnnIndex:
        """The ANN index beside the store as opened, over the final model's rows, read the first time it is used
        and refused unless it was built for the store this attributor loaded."""
        if self._ann is None:
            self._ann = AnnIndex(self.opened.path, self.store)
        return self._ann

    # ---- queries ----------------------------------------------------------------------------------
    def queries_from_rows(self, rows: list[Row], source: str, tokenizer=None) -> list[Query]:
        """Tokenised queries (with `tokenizer` when given: a copy another thread may use meanwhile)."""
        tokenized = tokenize_rows(rows, tokenizer or self.context.tokenizer, self.config.data.max_length, source)
        return [
            Query(
                row.id,
                tok,
                text=row.text if row.messages is None else row.display,
                prompt=row.prompt,
                completion=row.completion,
            )
            for row, tok in zip(rows, tokenized)
        ]

    def generated_queries(self, prompts: list[PromptRow], settings: GenerationSettings, source: str) -> list[Query]:
        """Complete each prompt with the model; the generated token ids are what gets attributed."""
        generated = generate(
            self.context.model, self.context.tokenizer, prompts, settings, self.config.data.max_length, source
        )
        return [
            Query(g.prompt.id, g.row, prompt=g.prompt_text, completion=g.completion, generated=True) for g in generated
        ]

    # ---- scoring ----------------------------------------------------------------------------------
    def check_store_unchanged(self) -> None:
        """StoreChanged unless every store this attributor loaded is still the one at its path (not replaced
        by `tributary index --overwrite`, removed, or being rewritten)."""
        for path, loaded in self._loaded.items():
            check_unchanged(path, loaded, "this process")

    def attribute(self, groups: list[QueryGroup], need_full: bool = False) -> list[QueryResult]:
        """Each group's results (with records). Methods with one term at the final checkpoint share one read
        of the store per normalisation for all groups; a method over several checkpoints or stages (TracIn,
        TRAK ensembles, multi-segment Source) reads its stores for its group, in this process.

        The kept ids and factors belong to the store as loaded, so the store's identity is checked before the
        pass and after it (rows read meanwhile may be another store's): a change is StoreChanged, also when
        the pass failed reading a store that was being rewritten."""
        self.check_store_unchanged()
        try:
            results = self._attribute(groups, need_full)
        except StoreChanged:
            raise
        except Exception:
            self.check_store_unchanged()  # a failure while the store changed underneath is that change
            raise
        self.check_store_unchanged()
        return results

    def _attribute(self, groups: list[QueryGroup], need_full: bool) -> list[QueryResult]:
        prepared = [self._resources([q.row for q in group.queries], group.options.measurement) for group in groups]
        terms = [group.method.terms(resources) for group, resources in zip(groups, prepared)]
        for group, group_terms in zip(groups, terms):
            _require_finite_queries(group.queries, group_terms)
        extra = len(self.skipped)  # ask for k + skipped so that k remain once the skipped rows are dropped
        results: list[QueryResult | None] = [None] * len(groups)
        single = [i for i in range(len(groups)) if prepared[i].is_single_term(terms[i])]
        single += [  # in a training run, only the index ranks final-model methods without a pass per checkpoint
            i
            for i in range(len(groups))
            if i not in single and self._pass(groups[i], need_full)[1] and prepared[i].scores_final_rows(terms[i])
        ]
        for i in set(range(len(groups))) - set(single):
            if groups[i].options.approximate:
                log.info(
                    "method %s is not a single-term method, so the ANN index cannot rank it; scanning exactly",
                    groups[i].method.name,
                )
            if self.config.cluster is not None:
                log.warning(
                    "method %s scores several checkpoints; scoring in this process, not on the cluster",
                    groups[i].method.name,
                )
            k = groups[i].options.k
            results[i] = without_rows(
                QueryResult(*prepared[i].score(terms[i], groups[i].method, k + extra)), self.skipped, k
            )
        passes = {i: self._pass(groups[i], need_full) for i in single}
        for normalise, approximate, rerank in sorted(set(passes.values())):
            members = [i for i in single if passes[i] == (normalise, approximate, rerank)]
            k = max(groups[i].options.k for i in members)
            transformed = np.concatenate([terms[i][0].transformed for i in members])
            if approximate:
                ranked = rank_approximate(self.ann_index(), self.store, transformed, normalise, k + extra, rerank)
            else:
                ranked = self.scan(transformed, normalise, k + extra, need_full)
                self.scoring_passes += 1
            start = 0
            for i in members:
                stop = start + len(groups[i].queries)
                k = groups[i].options.k
                results[i] = without_rows(ranked.select(start, stop, k + extra), self.skipped, k)
                start = stop
        scored = [result for result in results if result is not None]
        if len(scored) != len(groups):
            raise RuntimeError("a query group was scored neither as a single term nor in this process")
        for group, resources, group_terms, result in zip(groups, prepared, terms, scored):
            self._add_details(group, resources, group_terms, result)
        return scored

    @staticmethod
    def _pass(group: QueryGroup, need_full: bool) -> tuple[bool, bool, int]:
        """Which pass ranks a single-term group: (normalise, approximate, rerank); the exact scan whenever
        every score is wanted (the index has only candidates)."""
        approximate = group.options.approximate
        if approximate and need_full:
            log.info("full scores (--scores-out) need the exact scan; ranking method %s exactly", group.method.name)
            approximate = False
        return group.method.normalise, approximate, group.options.rerank if approximate else 0

    def _factors_for(self, method: Method) -> dict | None:
        return self.factors() if method.spectral is not None else None

    def _add_details(
        self, group: QueryGroup, resources: StoreResources, terms: list[QueryTerm], result: QueryResult
    ) -> None:
        options, method = group.options, group.method
        listed = {"top": result.top_indices, "bottom": result.bottom_indices}
        if options.per_module:
            result.per_module = {kind: resources.per_module(terms, rows, method) for kind, rows in listed.items()}
        if options.per_token:
            result.per_token = self._per_token(group.queries, listed, method, options.measurement)
        pieces = [token_pieces(self.context.tokenizer, q.row) for q in group.queries]
        result.records = result_records(
            group.queries, result, self.ids, self.snippets, method.name, options.measurement, self.module_names, pieces
        )

    def _per_token(
        self, queries: list[Query], listed: dict[str, np.ndarray], method: Method, measurement: str
    ) -> dict[str, list[np.ndarray]]:
        """Per listed kind ("top"/"bottom"), (k, T) per query: each listed row's score split over the
        completion tokens (single-checkpoint stores, single-term methods: see `check_method`).

        Token t's share is the score of the gradient of token t's own term of the measurement, so the shares
        sum to the score (exactly for logprob_sum and margin; logprob_mean divides each term by T). The token
        gradients (one forward and one backward per token) serve every listed kind.
        """
        out: dict[str, list[np.ndarray]] = {kind: [] for kind in listed}
        for q, query in enumerate(queries):
            grads = token_gradients(self.context, query.row, measurement)
            if measurement == "logprob_mean":
                grads = grads / len(grads)
            if method.normalise:  # Grad-Cos: every share is divided by the norm of the whole query gradient
                token_side = grads / max(float(np.linalg.norm(grads.sum(axis=0))), 1e-300)
            else:
                token_side = transform_queries(grads, self.spec, method, self._factors_for(method))
            for kind, indices in listed.items():
                out[kind].append(score_block(token_side, self.store.read_row_selection(indices[q]), method).T)
        return out
