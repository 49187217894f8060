"""What the methods may ask for, served from a store (engine.spectral.methods.Resources).

A single-checkpoint store is the run's only checkpoint "c0" (its segment's η̄ and K come from method.eta /
method.steps). A training-run store serves each checkpoint's rows and factors from its sub-store, Source's
per-segment factors and preconditioners from the root, and query gradients at any checkpoint by loading
that checkpoint's weights (the final one is the model already loaded for the queries).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from engine.config import JobConfig
from engine.curvature.dense import dense_gram_factors
from engine.curvature.factors import ModuleFactors
from engine.data.rows import file_fingerprint, read_rows
from engine.data.tokenize import TokenizedRow
from engine.indexing.compute import gradient_pass
from engine.indexing.job import ModelContext, field_names, load_model_context
from engine.projection import ProjectionSpec
from engine.query.scoring import top_k_with_scores
from engine.spectral.core import QueryTerm, score_block_per_module, score_terms
from engine.spectral.methods import Method
from engine.store import GradientStore
from engine.store.run_store import RunStore
from engine.training_run.configs import checkpoint_config
from engine.training_run.plan import RunPlan

log = logging.getLogger(__name__)


class StoreResources:
    def __init__(
        self,
        config: JobConfig,
        store: GradientStore | RunStore,
        spec: ProjectionSpec,
        final_context: ModelContext,
        rows: list[TokenizedRow],
        measurement: str,
        shared: dict | None = None,
    ):
        self.config = config
        self.spec = spec
        self.run = store if isinstance(store, RunStore) else None
        self.single = store if isinstance(store, GradientStore) else None
        self.plan: RunPlan = self.run.plan if self.run is not None else RunPlan.single(path=config.model.path)
        self._final_context = final_context
        self._rows = rows
        self._measurement = measurement
        self._cache: dict[tuple, object] = {}
        # stores, factors and dense Grams do not depend on the queries: a long-lived caller (the service)
        # passes one dict to every instance so they are read once
        self._shared: dict[tuple, object] = {} if shared is None else shared

    def _cached(self, key: tuple, compute):
        cache = self._cache if key[0] == "queries" else self._shared
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    def store(self, key: str) -> GradientStore:
        if self.run is None:
            return self.single
        return self._cached(("store", key), lambda: self.run.checkpoint(key))

    # ---- Resources --------------------------------------------------------------------------------
    def query_gradients(self, key: str) -> np.ndarray:
        def compute() -> np.ndarray:
            context = self._final_context
            if key != self.plan.final.name:
                checkpoint = self.plan.checkpoint(key)
                dataset = self.plan.datasets[self.plan.segments[checkpoint.segment].dataset]
                context = load_model_context(
                    checkpoint_config(self.config, checkpoint.path, dataset, self.run.checkpoint_path(key)),
                    spec=self.spec,
                )
            return gradient_pass(context, self._rows, with_covariance=False, measurement=self._measurement).grads

        return self._cached(("queries", key), compute)

    def factors(self, key: str) -> dict[str, ModuleFactors]:
        def compute() -> dict[str, ModuleFactors]:
            if key.startswith("avg"):
                return self.store(key).read_factors("preconditioned_factors" if self.plan.preconditioned else "factors")
            if key.startswith("s"):
                index = int(key[1:])
                if self.run is not None and self.run.has_segment_factors(index):
                    return self.run.read_segment_factors(index)
                return self.factors(self.plan.segments[index].checkpoints[0])
            return self.store(key).read_factors()

        return self._cached(("factors", key), compute)

    def dense_factors(self, key: str) -> dict[str, ModuleFactors]:
        return self._cached(("dense", key), lambda: dense_gram_factors(self.training_blocks(key), self.spec))

    def training_blocks(self, key: str) -> Iterator[np.ndarray]:
        for _, _, rows in self.store(key).iter_chunks():
            yield rows

    def preconditioner(self, segment: int) -> dict[str, np.ndarray]:
        return self.run.read_segment_preconditioner(segment)

    # ---- rows of the score matrix -------------------------------------------------------------------
    def _dataset_key(self, dataset: int) -> str:
        return next(s.checkpoints[0] for s in self.plan.segments if s.dataset == dataset)

    def offsets(self) -> list[int]:
        sizes = [self.store(self._dataset_key(d)).rows for d in range(len(self.plan.datasets))]
        return list(np.cumsum([0] + sizes))

    @property
    def rows(self) -> int:
        return int(self.offsets()[-1])

    def ids(self) -> list[str]:
        return [i for d in range(len(self.plan.datasets)) for i in self.store(self._dataset_key(d)).ids()]

    def snippets(self, chars: int) -> list[str] | None:
        out = []
        # a single-checkpoint store's one dataset is data.train (its plan names a placeholder)
        datasets = self.plan.datasets if self.run is not None else (self.config.data.train,)
        for d, path in enumerate(datasets):
            store = self.store(self._dataset_key(d))
            if not Path(path).is_file() or file_fingerprint(path) != store.manifest["fingerprints"].get("dataset"):
                log.warning(
                    "training file %s is missing or differs from the indexed one; results carry ids, no snippets", path
                )
                return None
            out.extend(row.snippet(chars) for row in read_rows(path, field_names(self.config)))
        return out

    def is_single_term(self, terms: list[QueryTerm]) -> bool:
        """One term against the one set of rows: the plain single-store scoring path applies."""
        return (
            len(terms) == 1 and len(self.plan.datasets) == 1 and (self.run is None or len(self.plan.checkpoints) == 1)
        )

    def _blocks(self, key: str):
        offset = self.offsets()[self.plan.dataset_of(key)]
        for start, stop, rows in self.store(key).iter_chunks():
            yield offset + start, offset + stop, rows

    def score(self, terms: list[QueryTerm], method: Method, k: int):
        """(top, top scores, bottom, bottom scores, full (Q, rows)) of a multi-term method, in this process."""
        total = score_terms(terms, self._blocks, self.rows, method)
        top, top_scores = top_k_with_scores(total, k)
        bottom, bottom_scores = top_k_with_scores(-total, k)
        return top, top_scores, bottom, -bottom_scores, total

    def _selection(self, key: str, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in `indices` that belong to key's dataset, their stored rows)."""
        offsets = self.offsets()
        dataset = self.plan.dataset_of(key)
        inside = np.flatnonzero((indices >= offsets[dataset]) & (indices < offsets[dataset + 1]))
        if not len(inside):
            return inside, np.zeros((0, self.spec.total_width))
        return inside, self.store(key).read_row_selection(indices[inside] - offsets[dataset])

    def per_module(self, terms: list[QueryTerm], indices: np.ndarray, method: Method) -> list[np.ndarray]:
        """(k, M) per query: each module's share of the listed rows' scores, summed over the terms."""
        out = []
        for q, listed in enumerate(indices):
            shares = np.zeros((len(listed), len(self.spec.modules)))
            for term in terms:
                inside, rows = self._selection(term.key, listed)
                if len(inside):
                    shares[inside] += score_block_per_module(term.transformed[q : q + 1], rows, self.spec, method)[
                        :, 0, :
                    ].T
            out.append(shares)
        return out
