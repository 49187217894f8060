"""projection.budget without measured_on: the fit pass that measures each module's effective dimension before the
store is built, so the budget is split without a prior full-width store.

The pass is the fitted kinds' `projection` stage (full-width K-FAC covariance sums of every row, or with
projection.budget.fit_rows of every ⌈N/fit_rows⌉-th row, per shard, summed
in shard order by the driver), run into the measurement store at store.path + ".budget" (engine.store.budget).
That store is resumable as any index is (each shard is committed once in its manifest), and 1 or N workers give
the same sums, so the same k. From the sums: the K-FAC eigenvalues a_i·s_j per module, and Σ Λ/(Λ+λ) over them
(engine.projection.budget.effective_dimension, the damping of method.damping or 0.1 x their mean), kept there as
one number per module. The K-FAC products stand in for EK-FAC's Λ, which would need a second pass.
"""

from __future__ import annotations

import numpy as np

from engine.config import JobConfig
from engine.curvature.factors import eigendecompose
from engine.curvature.packing import covariance_counts, shapes_width, unpack_covariance
from engine.data.rows import dataset_fingerprint
from engine.indexing.executor import ExecutorFactory
from engine.indexing.manifest import build_manifest
from engine.indexing.single_store import IndexRun
from engine.progress import progress_bar
from engine.projection import ProjectionSpec
from engine.projection.budget import effective_dimension
from engine.projection.fitted import fit_shapes, fit_shards, full_width
from engine.store import GradientStore
from engine.store.budget import MEASURED, measurement_path
from engine.store.lock import StoreLock
from engine.store.manifest import StoreManifest
from engine.store.opening import open_or_create


def measuring_config(config: JobConfig) -> JobConfig:
    """The config of the measurement store: the same model, data and curvature, a fitted kind of width 1 (so its
    fit pass is the full-width covariance pass), no budget, no exact factors."""
    budget = config.projection.budget
    fit_rows = None if budget is None else budget.fit_rows
    projection = {"kind": "kfac_eigen", "dim": 1, "seed": config.projection.seed, "fit_rows": fit_rows}
    return JobConfig.model_validate(
        {
            **config.model_dump(exclude_unset=True),
            "projection": projection,
            "store": {**config.store.model_dump(exclude_unset=True), "path": measurement_path(config)},
            "exact": {"factors": False},
        }
    )


def needs_measuring(config: JobConfig) -> bool:
    budget = config.projection.budget
    return budget is not None and budget.measured_on is None


def measure_budget(
    config: JobConfig,
    rows: int,
    executors: ExecutorFactory,
    show_progress: bool,
    break_lock: bool = False,
    overwrite: bool = False,
) -> None:
    """Fit (or resume, or find done) the measurement store of `config`'s projection.budget. A measurement made on
    another model, data or settings is refused like any store's resume (with `overwrite` it is made again), so
    a changed model never inherits the old split: that check needs the model's fingerprint, hence the executor
    even when the measurement is done."""
    measuring = measuring_config(config)
    path = measuring.store.path
    executor = executors(measuring)
    try:
        with StoreLock(path, break_lock=break_lock):
            facts = executor.describe()
            spec = ProjectionSpec.from_dict(facts["spec"])
            manifest = StoreManifest.model_validate(
                dict(
                    build_manifest(measuring, spec, facts["fingerprints"], dataset_fingerprint(config.data.train)),
                    rows=rows,
                    width=spec.total_width,
                    dtype=measuring.store.dtype,
                    rows_per_chunk=measuring.store.rows_per_chunk or config.data.batch_size,
                )
            )
            store, _ = open_or_create(GradientStore, path, manifest, overwrite=overwrite)
            if not store.has_group(MEASURED):
                _fit(store, executor, spec, config.method.damping, show_progress)
    finally:
        executor.shutdown()


def _fit(store: GradientStore, executor, spec: ProjectionSpec, damping: float | None, show_progress: bool) -> None:
    full, shapes = full_width(spec), fit_shapes(spec)
    if not store.manifest.shards.get("projection"):
        store.create_partials("projection_covariance", shapes_width(shapes), covariance_counts(full))
    fitted = fit_shards(store.shards(), store.rows, spec.fit_rows)
    with progress_bar(show_progress) as progress:
        run = IndexRun(store, executor, spec, progress, len(getattr(executor, "actors", [None])))
        run.stage("projection", only=fitted)
    sums = unpack_covariance(*store.summed_partials("projection_covariance", fitted), full, shapes)
    effective = {
        name: np.array([effective_dimension(eigendecompose(sums[name], "kfac").lam, damping)])
        for name in (m.name for m in spec.modules)
    }
    store.write_module_arrays(MEASURED, effective)
    store.update_manifest(complete=True)
    if "partials" in store.group:  # full-width sums, ~100 MB a shard at 256 wide: only the numbers are kept
        del store.group["partials"]
