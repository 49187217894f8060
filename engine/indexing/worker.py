"""A shard worker: holds one loaded model, computes whole shards and writes them into the store itself.

The same class runs in-process (single-process index) and inside a Ray actor. It holds no global
plan: the driver says which shard of which stage to compute; the worker returns a receipt (checksum,
node, pid) and the driver alone records completion in the manifest.
"""

from __future__ import annotations

import os
import sys
import time

from engine.config import JobConfig
from engine.curvature.factors import ModuleFactors
from engine.curvature.packing import pack_covariance, pack_lambda, shapes_width, unpack_covariance
from engine.curvature.row_lambdas import row_lambda_sums
from engine.data.rows import Row, field_names, read_rows, rows_between
from engine.data.sources import is_table_source
from engine.data.tokenize import tokenize_rows
from engine.errors import TributaryError
from engine.gradients.context import ModelContext, load_model_context, with_projection, with_stored_projection
from engine.gradients.finite import NonFinite, nonfinite_rows_error, nonfinite_vector_modules
from engine.gradients.passes import (
    ShardGradients,
    covariance_pass,
    gradient_pass,
    gradient_pass_without,
    lambda_pass,
)
from engine.indexing.exact_sums import PASS_ONE_EXACT, has_pass_one_sums
from engine.indexing.lambda_source import lambda_source, writes_fisher_rows
from engine.projection.fitted import (
    covariance_shapes,
    fit_row_positions,
    fit_shapes,
    fit_shards,
    full_width,
    sketch_matrices,
)
from engine.projection.whitened import whitening_matrices, whitening_spec
from engine.store import GradientStore
from engine.store.budget import budgeted_context
from engine.testing.faults import fault_point


def _node_id() -> str:
    # Ray is only looked at when something has imported it: importing it to learn that it is not running costs
    # a local index about 45 MB of its peak memory.
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return "local"


class ShardWorker:
    def __init__(self, config: JobConfig, threads: int | None = None, context: ModelContext | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.config = config
        self.context = budgeted_context(config, context or load_model_context(config))
        self._rows: list[Row] | None = None
        self._range: tuple[tuple[int, int], list[Row]] | None = None
        self._store: GradientStore | None = None
        self._factors: dict[str, ModuleFactors] | None = None
        self._scale = None
        self._full_width: ModelContext | None = None
        self._whitened: ModelContext | None = None  # grad_pca_whitened's second fit sweep's capture
        self._pass_one_capture: ModelContext | None = None

    # ---- facts for the driver --------------------------------------------------------------------
    def describe(self) -> dict:
        return {
            "spec": self.context.spec.to_dict(),
            "fingerprints": self.context.fingerprints,
            "coverage": self.context.coverage.to_dict() if self.context.coverage is not None else {},
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

    def _shard_rows(self, start: int, stop: int) -> list[Row]:
        """The rows of one shard: Parquet/Arrow inputs are read by row range (the last shard's kept), a JSONL
        file is read whole once."""
        train = self.config.data.train
        if not is_table_source(train):
            if self._rows is None:
                self._rows = read_rows(train, field_names(self.config), what="data.train")
            return self._rows[start:stop]
        if self._range is None or self._range[0] != (start, stop):
            self._range = ((start, stop), rows_between(train, field_names(self.config), start, stop, "data.train"))
        return self._range[1]

    def _tokenized(self, start: int, stop: int):
        return tokenize_rows(
            self._shard_rows(start, stop),
            self.context.tokenizer,
            self.config.data.max_length,
            self.config.data.train,
            log_truncation=False,
            vocab_size=self.context.vocab_size,
        )

    def _receipt(
        self,
        stage: str,
        shard: int,
        started: float,
        checksum: str | None = None,
        arrays: dict | None = None,
        skipped: list | None = None,
    ) -> dict:
        return {
            "stage": stage,
            "shard": shard,
            "checksum": checksum,
            "arrays": arrays or {},
            "node": _node_id(),
            "pid": os.getpid(),
            "seconds": round(time.perf_counter() - started, 4),
            "skipped": skipped or [],
        }

    def _ids(self, start: int, stop: int) -> list[str]:
        return [row.id for row in self._shard_rows(start, stop)]

    def _check_sums(self, stage: str, shard: int, vector, widths: list[tuple[str, int]]) -> None:
        """A shard's packed sums hold no NaN/inf (each row was checked; this catches an overflowing sum)."""
        modules = nonfinite_vector_modules(vector, widths)
        if modules:
            start, stop = self._open().shards()[shard]
            raise TributaryError(
                f"{self.config.data.train}: the {stage} sums of rows {start}..{stop - 1} overflow (non-finite) in "
                f"{', '.join(modules)}; check model.dtype (float16 overflows where float32 does not) and model.path"
            )

    def _row_check(self, ids: list[str], start: int, positions: list[int]):
        """A lambda_pass callback that stops at the first non-finite rows (positions among `positions`)."""

        def refuse(found: NonFinite) -> None:
            rows = {positions[p]: names for p, names in found.items()}
            raise nonfinite_rows_error(rows, ids, start, self.config.data.train)

        return refuse

    def _kept(self, store: GradientStore, start: int, stop: int) -> list[int]:
        """Positions in the shard of the rows pass 1 did not skip (data.on_nonfinite: skip)."""
        skipped = {row.row for row in store.manifest.skipped}
        return [p for p in range(stop - start) if start + p not in skipped]

    def _fitted(self, store: GradientStore) -> None:
        """Project with the store's fitted matrices from here on (fitted kinds; read once per worker)."""
        self.context = with_stored_projection(self.context, store.read_projection)

    # ---- stages ---------------------------------------------------------------------------------
    def projection(self, shard: int) -> dict:
        """The fitting pass for one shard (fitted projection kinds): full-width covariance sums of its fit rows
        (grad_pca's per-example gradient Grams; grad_pca_whitened's whole K-FAC covariances, unsketched)."""
        if self._full_width is None:
            self._full_width = with_projection(self.context, full_width(self.context.spec))
        kind = self.context.spec.kind
        sketch = None if kind == "grad_pca_whitened" else self._fit_sketch()
        shapes = covariance_shapes(self.context.spec)
        return self._fit_sums(shard, "projection", self._full_width, sketch, kind == "grad_pca", shapes)

    def projection_gram(self, shard: int) -> dict:
        """grad_pca_whitened's second sweep over one shard's fit rows: Σ G̃ᵀ G̃ and Σ G̃ G̃ᵀ of the per-example
        gradients whitened by the inverse roots of the first sweep's summed covariances (engine.projection.whitened)."""
        if self._whitened is None:
            store = self._open()
            spec = self.context.spec
            full = full_width(spec)
            shards = fit_shards(store.shards(), store.rows, spec.fit_rows)
            sums = unpack_covariance(
                *store.summed_partials("projection_covariance", shards), full, covariance_shapes(spec)
            )
            whitening = whitening_matrices({name: (c.a_sum, c.s_sum) for name, c in sums.items()})
            self._whitened = with_projection(self.context, whitening_spec(spec, whitening))
        return self._fit_sums(
            shard, "projection_gram", self._whitened, self._fit_sketch(), True, fit_shapes(self.context.spec)
        )

    def _fit_sums(self, shard: int, stage: str, context: ModelContext, sketch, per_example: bool, shapes) -> dict:
        """One fit sweep over a shard's fit rows with `context`'s capture, its sums written as the partial `stage`
        + "_covariance" (stage projection) or `stage` (the others)."""
        started = time.perf_counter()
        store = self._open()
        start, stop = store.shards()[shard]
        spec = self.context.spec
        full = full_width(spec)
        rows = self._tokenized(start, stop)
        positions = fit_row_positions(store.rows, spec.fit_rows, start, stop)
        sums, found = covariance_pass(context, [rows[p] for p in positions], sketch, per_example=per_example)
        if found:  # as pass 1 treats them: stop, or fit on the finite rows alone (pass 1 then records the skip)
            ids = self._ids(start, stop)
            at = {positions[p]: names for p, names in found.items()}
            if self.config.data.on_nonfinite == "error":
                raise nonfinite_rows_error(at, ids, start, self.config.data.train)
            positions = [p for i, p in enumerate(positions) if i not in found]
            sums, again = covariance_pass(context, [rows[p] for p in positions], sketch, per_example=per_example)
            if again:  # rows finite alone but not in a batch: refuse rather than guess
                raise nonfinite_rows_error(
                    {positions[p]: n for p, n in again.items()}, ids, start, self.config.data.train
                )
        packed = pack_covariance(sums, full)
        widths = [(m.name, shapes_width([module_shapes])) for m, module_shapes in zip(full.modules, shapes)]
        self._check_sums(f"{stage} covariance", shard, packed[0], widths)
        fault_point("actor", stage, shard)
        store.write_partial("projection_covariance" if stage == "projection" else stage, shard, *packed)
        return self._receipt(stage, shard, started)

    def _fit_sketch(self):
        """The fitting pass's Ω per module and side (projection.fit: sketch), in the capture's dtype and device."""
        import torch

        def tensor(matrix):
            if matrix is None:
                return None
            return torch.from_numpy(matrix).to(dtype=self.context.capture.compute_dtype, device=self.context.device)

        return {name: (tensor(a), tensor(s)) for name, (a, s) in sketch_matrices(self.context.spec).items()}

    def gradients(self, shard: int) -> dict:
        """Pass 1 for one shard: rows, metadata and covariance sums written to the store."""
        started = time.perf_counter()
        store = self._open()
        self._fitted(store)
        self._full_width = self._whitened = None  # the fitting pass is over: its captures are not needed again
        start, stop = store.shards()[shard]
        rows = self._tokenized(start, stop)
        ids = self._ids(start, stop)
        fisher_rows = writes_fisher_rows(self.config) and store.has_fisher_rows()
        full = self._pass_one_full(store)
        result = gradient_pass(self.context, rows, start, fisher_rows=fisher_rows, full=full)
        skipped = []
        if result.nonfinite:
            if self.config.data.on_nonfinite == "error":
                raise nonfinite_rows_error(result.nonfinite, ids, start, self.config.data.train)
            left_out = result.nonfinite
            result = gradient_pass_without(self.context, rows, start, left_out, fisher_rows=fisher_rows, full=full)
            if result.nonfinite:  # rows finite alone but not in a batch: refuse rather than guess
                raise nonfinite_rows_error(result.nonfinite, ids, start, self.config.data.train)
            skipped = [{"row": start + p, "id": ids[p], "modules": names} for p, names in left_out.items()]
        checksum, arrays = self._write_pass_one(store, shard, start, ids, result)
        return self._receipt("gradients", shard, started, checksum, arrays, skipped)

    def _pass_one_full(self, store: GradientStore) -> ModelContext | None:
        """The model captured at full width where pass 1 also sums the full-width covariances (exact.factors)."""
        if not has_pass_one_sums(store):
            return None
        if self._pass_one_capture is None:
            self._pass_one_capture = with_projection(self.context, full_width(self.context.spec))
        return self._pass_one_capture

    def _write_pass_one(
        self, store: GradientStore, shard: int, start: int, ids: list[str], result: ShardGradients
    ) -> tuple[str, dict]:
        """Write one shard's pass 1: its rows (and fisher_grads), then its covariance sums, checked finite."""
        packed = pack_covariance(result.sums.covariance, self.context.spec) if result.sums.covariance else None
        if packed is not None:
            widths = [(m.name, m.k_in**2 + m.k_out**2) for m in self.context.spec.modules]
            self._check_sums("covariance", shard, packed[0], widths)
        checksum, arrays = store.write_rows(start, result.grads, ids, result.num_tokens, result.losses)
        if result.fisher_grads is not None:
            store.write_fisher_rows(start, result.fisher_grads)
        fault_point("actor", "gradients", shard)
        if packed is not None:
            store.write_partial("covariance", shard, *packed)
        if result.full_covariance:
            full = full_width(self.context.spec)
            exact = pack_covariance(result.full_covariance, full)
            self._check_sums(
                "full-width covariance", shard, exact[0], [(m.name, m.k_in**2 + m.k_out**2) for m in full.modules]
            )
            store.write_partial(PASS_ONE_EXACT, shard, *exact)
        return checksum, arrays

    def lambdas(self, shard: int) -> dict:
        """Pass 2 for one shard: Σ (Q_Sᵀ G̃ Q_A)² written to the store."""
        started = time.perf_counter()
        store = self._open()
        if self._factors is None:
            self._factors = store.read_factors()
        start, stop = store.shards()[shard]
        packed = self._lambda_sums(store, start, stop, self._factors, None)
        self._check_sums("lambda", shard, packed[0], self._lambda_widths())
        fault_point("actor", "lambdas", shard)
        store.write_partial("lambda", shard, *packed)
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
        packed = self._lambda_sums(store, start, stop, self._factors, self._scale)
        self._check_sums("segment lambda", shard, packed[0], self._lambda_widths())
        store.write_partial("segment_lambda", shard, *packed)
        return self._receipt("segment_lambdas", shard, started)

    def _lambda_widths(self) -> list[tuple[str, int]]:
        return [(m.name, m.k_in * m.k_out) for m in self.context.spec.modules]

    def _lambda_sums(self, store: GradientStore, start: int, stop: int, factors, scale):
        """Λ sums of a shard's rows that pass 1 kept, packed: from the store where it holds the rows Λ needs
        (engine.indexing.lambda_source), else pass 2; a non-finite row stops pass 2, named."""
        self._fitted(store)
        stored = self._stored_rows(store)
        if stored is not None:
            kept = self._kept(store, start, stop)
            rows = stored(start, stop)[kept]
            sums = row_lambda_sums(rows, self.context.spec, factors, scale, self.context.device)
            return pack_lambda(sums, self.context.spec)
        rows = self._tokenized(start, stop)
        kept = self._kept(store, start, stop)
        check = self._row_check(self._ids(start, stop), start, kept)
        sums = lambda_pass(self.context, [rows[p] for p in kept], factors, scale, on_nonfinite=check)
        return pack_lambda(sums.lambdas, self.context.spec)

    def _stored_rows(self, store: GradientStore):
        """The store's reader of the rows Λ is a sum over (rows: empirical Fisher; fisher_grads: true Fisher),
        or None where Λ needs the model (curvature.lambdas, or fisher_grads not written or deleted)."""
        if lambda_source(self.config) != "store":
            return None
        if self.config.curvature.fisher is True:
            return store.read_fisher_rows if store.has_fisher_rows() else None
        return store.read_rows

    def reset(self) -> None:
        """Forget cached store state (a new stage may have written new factors)."""
        self._store = None
        self._factors = None
        self._whitened = None
