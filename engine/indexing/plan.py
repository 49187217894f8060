"""What `tributary index` would do with a config, resolved without loading weights or writing anything: the rows
(read and tokenised, as the index checks them first), the row width from the model's structure alone, the
passes over the data, the bytes of the store, and what is already at store.path. `tributary plan` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.capture.experts import refuse_partitioned_experts
from engine.config import JobConfig
from engine.curvature.factors import NEEDS_COVARIANCE, NEEDS_LAMBDA_PASS
from engine.gradients.context import configured_projection, structure_shapes
from engine.indexing.inputs import validated_row_count
from engine.indexing.lambda_source import lambda_source, writes_fisher_rows
from engine.indexing.single_store import _partial_width
from engine.indexing.training_run_stores import check_training_index
from engine.model.loading import check_weight_files
from engine.projection import ProjectionSpec
from engine.store import location
from engine.store.manifest import stored_kind
from engine.store.opening import open_store
from engine.store.sizes import format_bytes, rows_bytes
from engine.store.zarr_store import default_rows_per_chunk
from engine.training_run.optimizer_state import meta_model
from engine.training_run.plan import RunPlan
from engine.training_run.resolve import resolve_run


@dataclass(frozen=True)
class IndexPlan:
    config: JobConfig
    run: RunPlan | None  # a training run's checkpoints and segments; None: the final model only
    rows: dict[str, int]  # training rows of each data file
    spec: ProjectionSpec | None  # the tracked modules' projection; None with an adapter (known once it loads)

    @property
    def existing(self) -> str:
        """What store.path holds now (read when printed: the index itself opens the store under its lock)."""
        return _existing(self.config.store.path)

    @property
    def checkpoint_rows(self) -> list[int]:
        """Rows stored for each checkpoint (one entry for a single-checkpoint store)."""
        if self.run is None:
            return [self.rows[self.config.data.train]]
        return [self.rows[self.run.datasets[self.run.segments[c.segment].dataset]] for c in self.run.checkpoints]

    @property
    def store_bytes(self) -> int | None:
        """Bytes of the stored rows (and of the sampled-label rows pass 1 writes beside them, where it does)."""
        if self.spec is None:
            return None
        copies = 2 if writes_fisher_rows(self.config) else 1
        return copies * rows_bytes(sum(self.checkpoint_rows), self.spec.total_width, self.config.store.dtype)

    def passes(self) -> list[str]:
        """The passes over the training rows of each checkpoint, in order."""
        config = self.config
        strategy = config.curvature.strategy
        passes = []
        if (
            config.projection.kind in ("kfac_eigen", "eigen_sketch", "grad_pca", "grad_pca_whitened")
            and config.projection.dim > 0
        ):
            fitted = config.projection.fit_rows or "every"
            statistic = "per-example gradient Grams" if config.projection.kind == "grad_pca" else "K-FAC covariances"
            passes.append(f"projection fit: full-width {statistic} of {fitted} rows")
            if config.projection.kind == "grad_pca_whitened":
                passes.append(f"projection fit: whitened per-example gradient Grams of the same {fitted} rows")
        gradients = "gradients: one forward and backward per row"
        if strategy in NEEDS_COVARIANCE:
            gradients += ", summing K-FAC covariances"
        if writes_fisher_rows(config):
            gradients += ", writing the sampled-label rows (fisher_grads)"
        passes.append(gradients)
        if strategy in NEEDS_COVARIANCE:
            passes.append("eigendecomposition of the summed covariances (no pass over the rows)")
        if strategy in NEEDS_LAMBDA_PASS:
            passes.append(
                "Λ: a second forward and backward per row"
                if lambda_source(config) == "model"
                else "Λ: a read of the stored rows"
            )
        return passes


def resolve_index_plan(config: JobConfig) -> IndexPlan:
    """The checks `tributary index` runs before it loads weights (the run's checkpoints and schedule, training
    rows, weight files), with nothing written; the placement's devices and store.path's writability are checked
    when the index starts. engine.indexing.plan_and_build.plan_and_build executes the plan this returns."""
    run = resolve_run(config)
    if run is not None:
        check_training_index(config, run)
    datasets = run.datasets if run is not None else (config.data.train,)
    rows = {dataset: validated_row_count(config.derive(data={"train": dataset})) for dataset in datasets}
    weights = config.model.path if run is None else run.final.weights
    if run is None:
        check_weight_files(weights)
    spec = None
    structure = meta_model(weights, config.model.trust_remote_code)
    if config.placement.kind == "zero3":
        refuse_partitioned_experts(structure)
    if config.model.adapter is None:  # a training run refuses an adapter (engine.training_run.resolve)
        # a run has one projection for every checkpoint (it refuses the fitted kinds: engine.config.validation)
        spec = configured_projection(config, structure_shapes(config, structure))
    return IndexPlan(config, run, rows, spec)


def _existing(path: str) -> str:
    if not location.exists(path):
        return "nothing (a new store)"
    if stored_kind(path) is None:
        return "files that are not a Tributary store (index refuses to replace them)"
    if open_store(path).manifest.complete:
        return "a complete store (index has nothing to do; --overwrite rebuilds it)"
    return "an incomplete store (index resumes it when built from the same inputs)"


def describe_index_plan(plan: IndexPlan) -> list[tuple[str, str]]:
    """What the index would do, as (what, value) lines for `tributary plan`."""
    config = plan.config
    placement = config.placement
    where = "in this process" if config.cluster is None else f"on Ray ({config.cluster.address})"
    lines = [
        ("command", "index"),
        ("method", config.method.name),
        ("model", config.model.path + ("" if config.model.adapter is None else f" + adapter {config.model.adapter}")),
        ("placement", f"{placement.kind} x{placement.devices_per_replica}, {config.weights_dtype}, {where}"),
        ("store", location.redact(config.store.path)),
        ("store.path holds", plan.existing),
    ]
    if plan.run is not None:
        lines.append(("checkpoints", f"{len(plan.run.checkpoints)} in {len(plan.run.segments)} segment(s)"))
    lines.append(("training rows", ", ".join(f"{count} in {data}" for data, count in plan.rows.items())))
    if plan.spec is None:
        lines.append(("row width", "known once the adapter loads"))
    else:
        rows = plan.checkpoint_rows[-1]
        chunk = config.store.rows_per_chunk or default_rows_per_chunk(
            plan.spec.total_width, config.store.dtype, rows, config.data.batch_size, _partial_width(config, plan.spec)
        )
        lines.append(("row width", f"{plan.spec.total_width} ({config.store.dtype}), {len(plan.spec.modules)} modules"))
        lines.append(("shards", f"{-(-rows // chunk)} of up to {chunk} rows" + (" per checkpoint" if plan.run else "")))
        lines.append(("store bytes", format_bytes(plan.store_bytes or 0) + " of rows"))
    passes = plan.passes()
    each = " (each checkpoint)" if plan.run is not None else ""
    lines.extend((f"pass {i + 1}{each}", text) for i, text in enumerate(passes))
    lines.append(("reads", ", ".join([config.model.path, *plan.rows])))
    lines.append(("writes", location.redact(config.store.path)))
    return lines
