"""The caching half of a `Resources` implementation (the LM store's and the in-memory one).

Each resource is computed once per key. Query gradients depend on the query batch and are kept until
`forget_queries`; factors, dense Grams and preconditioners do not, and live in `shared`, which a
long-lived caller (the service) may pass to every instance so that they are read once. A segment of one
plain checkpoint has that checkpoint's factors (`RunPlan.fits_own_factors`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import numpy as np

from engine.curvature.dense import dense_gram_factors
from engine.curvature.fitting import Factors
from engine.projection import ProjectionSpec
from engine.training_run.keys import ResourceKey
from engine.training_run.plan import RunPlan

Value = TypeVar("Value")


class CachedResources(ABC):
    def __init__(self, spec: ProjectionSpec, plan: RunPlan, shared: dict[tuple[str, Any], Any] | None = None):
        self.spec = spec
        self.plan = plan
        self._queries: dict[ResourceKey, np.ndarray] = {}
        self._shared: dict[tuple[str, Any], Any] = {} if shared is None else shared

    def cached(self, what: str, key: Any, compute: Callable[[], Value]) -> Value:
        """`compute()` the first time (`what`, `key`) is asked for, the kept value after."""
        if (what, key) not in self._shared:
            self._shared[(what, key)] = compute()
        return self._shared[(what, key)]

    def forget_queries(self) -> None:
        self._queries = {}

    # ---- Resources --------------------------------------------------------------------------------
    def query_gradients(self, key: ResourceKey) -> np.ndarray:
        if key not in self._queries:
            self._queries[key] = self._query_gradients(key)
        return self._queries[key]

    def factors(self, key: ResourceKey) -> Factors:
        return self.cached("factors", key, lambda: self._factors(key))

    def dense_factors(self, key: ResourceKey) -> Factors:
        return self.cached("dense", key, lambda: dense_gram_factors(self.training_blocks(key), self.spec))

    def preconditioner(self, segment: int) -> dict[str, np.ndarray]:
        return self.cached("preconditioner", ResourceKey.segment(segment), lambda: self._preconditioner(segment))

    def _factors(self, key: ResourceKey) -> Factors:
        if key.kind == "checkpoint":
            return self._checkpoint_factors(key)
        if key.kind == "averaged":
            return self._averaged_factors(key.index)
        segment = self.plan.segments[key.index]
        if not self.plan.fits_own_factors(segment):
            return self.factors(segment.checkpoint_keys[0])
        return self._segment_factors(key.index)

    # ---- what an implementation computes ----------------------------------------------------------
    @abstractmethod
    def training_blocks(self, key: ResourceKey) -> Iterable[np.ndarray]:
        """The stored (projected) training rows under a checkpoint or averaged key, in blocks (n, D)."""

    @abstractmethod
    def _query_gradients(self, key: ResourceKey) -> np.ndarray:
        """(Q, D) projected query gradients at a checkpoint's (or averaged) parameters."""

    @abstractmethod
    def _checkpoint_factors(self, key: ResourceKey) -> Factors: ...

    @abstractmethod
    def _segment_factors(self, segment: int) -> Factors:
        """A segment's own factors (averaged over its checkpoints; of P̄^{1/2} H P̄^{1/2} when preconditioned)."""

    @abstractmethod
    def _averaged_factors(self, segment: int) -> Factors:
        """The factors at a segment's averaged parameters (of P̄^{1/2} H P̄^{1/2} when preconditioned)."""

    @abstractmethod
    def _preconditioner(self, segment: int) -> dict[str, np.ndarray]:
        """The segment's P̄ per module, in the stored layout."""
