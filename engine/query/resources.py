"""What the methods may ask for, served from a store (engine.spectral.methods.Resources).

A single-checkpoint store is the run's only checkpoint (its segment's η̄ and K come from method.eta /
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
from engine.curvature.factors import ModuleFactors
from engine.data.rows import dataset_fingerprint, field_names, iter_rows
from engine.data.sources import is_table_source, open_table_source
from engine.data.tokenize import TokenizedRow
from engine.errors import TributaryError
from engine.gradients.context import ModelContext, load_model_context
from engine.gradients.passes import gradient_pass
from engine.projection import ProjectionSpec
from engine.query.scoring import top_k_with_scores
from engine.spectral.core import QueryTerm, score_block_per_module, score_terms
from engine.spectral.methods import Method
from engine.spectral.resources import CachedResources
from engine.store import GradientStore
from engine.store.run_store import RunStore
from engine.training_run.configs import checkpoint_config
from engine.training_run.keys import ResourceKey

log = logging.getLogger(__name__)


class StoreResources(CachedResources):
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
        self.opened = store
        super().__init__(spec, store.run_plan(config), shared)
        self._final_context = final_context
        self._rows = rows
        self._measurement = measurement

    def store(self, key: ResourceKey) -> GradientStore:
        return self.cached("store", key, lambda: self.opened.checkpoint_store(key.group_name))

    # ---- Resources --------------------------------------------------------------------------------
    def _query_gradients(self, key: ResourceKey) -> np.ndarray:
        context = self._final_context
        if context.remote_gradients is not None:  # a zero3 group (a training run is refused with zero3)
            return context.remote_gradients(self._rows, self._measurement)
        if key != self.plan.final.key:
            checkpoint = self.plan.checkpoint(key)
            if checkpoint.path is None:  # a store captured during training keeps only the weights methods need
                raise TributaryError(
                    f"checkpoint {key} of store {self.config.store.path} kept no weights (captured during training "
                    "for a method that needs only the final model); capture with keep_weights=True to query this method"
                )
            dataset = self.plan.datasets[self.plan.segments[checkpoint.segment].dataset]
            context = load_model_context(
                checkpoint_config(self.config, checkpoint.weights, dataset, self.store(key).path),
                spec=self.spec,
            )
        return gradient_pass(context, self._rows, with_covariance=False, measurement=self._measurement).grads

    def _checkpoint_factors(self, key: ResourceKey) -> dict[str, ModuleFactors]:
        return self.store(key).read_factors()

    def _segment_factors(self, segment: int) -> dict[str, ModuleFactors]:
        return self.opened.read_segment_factors(segment)

    def _averaged_factors(self, segment: int) -> dict[str, ModuleFactors]:
        group = "preconditioned_factors" if self.plan.preconditioned else "factors"
        return self.store(ResourceKey.averaged(segment)).read_factors(group)

    def training_blocks(self, key: ResourceKey) -> Iterator[np.ndarray]:
        for _, _, rows in self.store(key).iter_chunks():
            yield rows

    def _preconditioner(self, segment: int) -> dict[str, np.ndarray]:
        return self.opened.read_segment_preconditioner(segment)

    # ---- rows of the score matrix -------------------------------------------------------------------
    def _dataset_key(self, dataset: int) -> ResourceKey:
        return next(s.checkpoint_keys[0] for s in self.plan.segments if s.dataset == dataset)

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
        for d, path in enumerate(self.plan.datasets):
            store = self.store(self._dataset_key(d))
            if not _readable(path) or dataset_fingerprint(path) != store.manifest.fingerprints.dataset:
                log.warning(
                    "training file %s is missing or differs from the indexed one; results carry ids, no snippets", path
                )
                return None
            out.extend(row.snippet(chars) for row in iter_rows(path, field_names(self.config)))
        return out

    def is_single_term(self, terms: list[QueryTerm]) -> bool:
        """One term against the one set of rows: the plain single-store scoring path applies."""
        return len(terms) == 1 and len(self.plan.datasets) == 1 and len(self.plan.checkpoints) == 1

    def scores_final_rows(self, terms: list[QueryTerm]) -> bool:
        """One term against the final model's rows, which are all the rows: ⟨transformed query, stored row⟩ of
        the store the ANN index covers (also in a training run of several checkpoints)."""
        return len(terms) == 1 and len(self.plan.datasets) == 1 and terms[0].key == self.plan.final.key

    def _blocks(self, key: ResourceKey):
        offset = self.offsets()[self.plan.dataset_of(key)]
        for start, stop, rows in self.store(key).iter_chunks():
            yield offset + start, offset + stop, rows

    def score(self, terms: list[QueryTerm], method: Method, k: int):
        """(top, top scores, bottom, bottom scores, full (Q, rows)) of a multi-term method, in this process."""
        total = score_terms(terms, self._blocks, self.rows, method)
        top, top_scores = top_k_with_scores(total, k)
        bottom, bottom_scores = top_k_with_scores(-total, k)
        return top, top_scores, bottom, -bottom_scores, total

    def _selection(self, key: ResourceKey, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _readable(path: str) -> bool:
    """The training data is still there to show snippets of: a JSONL file, or Parquet/Arrow files."""
    if is_table_source(path):
        try:
            open_table_source(path, "data.train")
        except TributaryError:
            return False
        return True
    return Path(path).is_file()
