"""A finished index, opened for a store and refused unless it was built for exactly that store; its search."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from engine.ann.layout import (
    IndexRecord,
    Metric,
    damaged_files,
    faiss_module,
    index_location,
    read_record,
    use_gpus,
)
from engine.errors import TributaryError
from engine.store import GradientStore
from engine.store.identity import identity_of
from engine.store.location import redact

log = logging.getLogger(__name__)


def metric_for(normalise: bool) -> Metric:
    """Grad-Cos (rows unit-normalised) searches the normalised index; every other single-term method the raw one."""
    return "cos" if normalise else "dot"


class AnnIndex:
    """The index beside `store_path` (whose rows are `store`'s), checked against the store's identity."""

    def __init__(self, store_path: str, store: GradientStore):
        self.store_path = store_path
        self.root = index_location(store_path)
        self.record = self._record(store)
        self.faiss = faiss_module()
        self._loaded: dict[Metric, Any] = {}
        self._rows: np.ndarray | None = None
        self._intact: set[str] = set()

    def _require_intact(self, name: str) -> None:
        """The file as the build wrote it (once per file and process), or a TributaryError naming it."""
        if name in self._intact:
            return
        problems = damaged_files(self.root, self.record, [name])
        if problems:
            raise TributaryError(
                f"the ANN index file {problems[0]}, so nothing is ranked with it; run {self._rebuild()} again "
                f"(`tributary info --verify {redact(self.store_path)}` lists what else is damaged)"
            )
        self._intact.add(name)

    def _rebuild(self) -> str:
        return f"`tributary ann build {redact(self.store_path)}`"

    def _record(self, store: GradientStore) -> IndexRecord:
        where = redact(self.store_path)
        record = read_record(self.root / "index.json", IndexRecord, "ANN index", f"run {self._rebuild()} again")
        if record is None:
            if (self.root / "build").exists():
                raise TributaryError(
                    f"the ANN index of store {where} is not finished (a build in {self.root / 'build'} stopped); "
                    f"run {self._rebuild()} to resume it"
                )
            raise TributaryError(
                f"store {where} has no ANN index (no {self.root / 'index.json'}); build it with {self._rebuild()}, "
                "or query without --approximate"
            )
        current = identity_of(store.manifest)
        if record.plan.identity != current:
            raise TributaryError(
                f"the ANN index at {self.root} was built for another state of store {where} (index: "
                f"{record.plan.identity.describe()}; store: {current.describe()}); the store changed since: run "
                f"{self._rebuild()} again"
            )
        return record

    @property
    def probes(self) -> int:
        return self.record.plan.settings.probes

    def require(self, metric: Metric) -> None:
        if metric not in self.record.files:
            raise TributaryError(
                f"the ANN index at {self.root} has no {metric} index (built with --metric "
                f"{','.join(self.record.files)}); run {self._rebuild()} --metric dot,cos"
            )

    def _index(self, metric: Metric):
        self.require(metric)
        if metric not in self._loaded:
            path: Path = self.root / self.record.files[metric]
            self._require_intact(self.record.files[metric])
            try:
                index = self.faiss.read_index(str(path))
            except RuntimeError as error:
                raise TributaryError(
                    f"the ANN index file {path} cannot be read ({str(error).splitlines()[0][:200]}); run "
                    f"{self._rebuild()} again"
                ) from None
            self.faiss.extract_index_ivf(index).nprobe = self.probes
            if use_gpus(self.faiss):
                index = self.faiss.index_cpu_to_all_gpus(index)
                self.faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", self.probes)
                log.info("ANN index %s searched on %d GPU(s)", path.name, self.faiss.get_num_gpus())
            self._loaded[metric] = index
        return self._loaded[metric]

    def read_rows(self, rows: np.ndarray) -> np.ndarray | None:
        """The given rows (sorted) from the index's row copy, or None when it was built without one."""
        if self.record.rows is None:
            return None
        copy = self._rows
        if copy is None:
            self._require_intact(self.record.rows)
            copy = self._rows = np.load(self.root / self.record.rows, mmap_mode="r")
        return np.asarray(copy[rows])

    def search(self, queries: np.ndarray, normalise: bool, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, scores, found) for the 2Q searches [queries; -queries]: the n best rows by the index's own
        inner products (best first; -1 where fewer were found) and how many each search found. The second
        half ranks the most opposing rows (its scores are negated inner products)."""
        index = self._index(metric_for(normalise))
        both = np.ascontiguousarray(np.concatenate([queries, -queries]).astype(np.float32))
        scores, ids = index.search(both, int(min(n, self.record.indexed_rows)))
        return ids.astype(np.int64), scores.astype(np.float64), (ids >= 0).sum(axis=1)
