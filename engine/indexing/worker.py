"""A shard worker: holds one loaded model, computes whole shards and writes them into the store itself.

The same class runs in-process (single-process index) and inside a Ray actor. It holds no global
plan: the driver says which shard of which stage to compute; the worker returns a receipt (checksum,
node, pid) and the driver alone records completion in the manifest.
"""

from __future__ import annotations

import os
import time

from engine.config import JobConfig
from engine.curvature.factors import ModuleFactors
from engine.curvature.packing import pack_covariance, pack_lambda
from engine.data.rows import Row, field_names, read_rows
from engine.data.tokenize import tokenize_rows
from engine.gradients.context import ModelContext, load_model_context
from engine.gradients.passes import gradient_pass, lambda_pass
from engine.store import GradientStore
from engine.testing.faults import fault_point


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:  # pragma: no cover
        pass
    return "local"


class ShardWorker:
    def __init__(self, config: JobConfig, threads: int | None = None, context: ModelContext | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.config = config
        self.context = context or load_model_context(config)
        self._rows: list[Row] | None = None
        self._store: GradientStore | None = None
        self._factors: dict[str, ModuleFactors] | None = None
        self._scale = None

    # ---- facts for the driver --------------------------------------------------------------------
    def describe(self) -> dict:
        return {
            "spec": self.context.spec.to_dict(),
            "fingerprints": self.context.fingerprints,
            "node": _node_id(),
            "pid": os.getpid(),
        }

    def ping(self) -> int:
        return os.getpid()

    # ---- helpers --------------------------------------------------------------------------------
    def _open(self) -> GradientStore:
        if self._store is None:
            self._store = GradientStore.open(self.config.store.path, mode="r+")
        return self._store

    def _train_rows(self) -> list[Row]:
        if self._rows is None:
            self._rows = read_rows(self.config.data.train, field_names(self.config), what="data.train")
        return self._rows

    def _tokenized(self, start: int, stop: int):
        return tokenize_rows(
            self._train_rows()[start:stop],
            self.context.tokenizer,
            self.config.data.max_length,
            self.config.data.train,
            log_truncation=False,
        )

    def _receipt(self, stage: str, shard: int, started: float, checksum: str | None = None) -> dict:
        return {
            "stage": stage,
            "shard": shard,
            "checksum": checksum,
            "node": _node_id(),
            "pid": os.getpid(),
            "seconds": round(time.perf_counter() - started, 4),
        }

    # ---- stages ---------------------------------------------------------------------------------
    def gradients(self, shard: int) -> dict:
        """Pass 1 for one shard: rows, metadata and covariance sums written to the store."""
        started = time.perf_counter()
        store = self._open()
        start, stop = store.shards()[shard]
        result = gradient_pass(self.context, self._tokenized(start, stop), start)
        ids = [row.id for row in self._train_rows()[start:stop]]
        checksum = store.write_rows(start, result.grads, ids, result.num_tokens, result.losses)
        fault_point("actor", "gradients", shard)
        if result.sums.covariance:
            store.write_partial("covariance", shard, *pack_covariance(result.sums.covariance, self.context.spec))
        return self._receipt("gradients", shard, started, checksum)

    def lambdas(self, shard: int) -> dict:
        """Pass 2 for one shard: Σ (Q_Sᵀ G̃ Q_A)² written to the store."""
        started = time.perf_counter()
        store = self._open()
        if self._factors is None:
            self._factors = store.read_factors()
        start, stop = store.shards()[shard]
        sums = lambda_pass(self.context, self._tokenized(start, stop), self._factors)
        fault_point("actor", "lambdas", shard)
        store.write_partial("lambda", shard, *pack_lambda(sums.lambdas, self.context.spec))
        return self._receipt("lambdas", shard, started)

    def segment_lambdas(self, shard: int) -> dict:
        """Training runs: Σ (Q_Sᵀ (s ⊙ G̃) Q_A)² of one shard in its segment's shared eigenbasis ("segment_basis",
        written by the driver), with s = P̄^{1/2} when the store holds a "segment_scale" (Adam)."""
        started = time.perf_counter()
        store = self._open()
        if self._factors is None:
            self._factors = store.read_factors("segment_basis")
            self._scale = store.read_module_arrays("segment_scale") if store.has_group("segment_scale") else None
        start, stop = store.shards()[shard]
        sums = lambda_pass(self.context, self._tokenized(start, stop), self._factors, self._scale)
        store.write_partial("segment_lambda", shard, *pack_lambda(sums.lambdas, self.context.spec))
        return self._receipt("segment_lambdas", shard, started)

    def reset(self) -> None:
        """Forget cached store state (a new stage may have written new factors)."""
        self._store = None
        self._factors = None
