"""The index driver: plans shards, hands them to an executor (this process or Ray actors), commits
each finished shard once in the manifest, reduces the per-shard statistics, and resumes a store that
an earlier run left incomplete.

Stages: `projection` (fitted projection kinds only: full-width covariance sums of the fit rows, made into each
side's matrix by the driver; grad_pca_whitened then `projection_gram`, its whitened Grams) → `gradients` (pass 1: rows + covariance sums per shard, and with the true Fisher the sampled-label rows
`fisher_grads`) → `eigen` (driver: reduce in shard order, eigendecompose in float64) → `lambdas` (EK-FAC/diagonal
Λ sums per shard: a read of the store, or pass 2 where engine.indexing.lambda_source says so) → `final`.
"""

from __future__ import annotations

import logging
import socket
import time

from engine.capture.coverage import coverage_lines, unrouted_line
from engine.config import JobConfig
from engine.curvature.factors import NEEDS_COVARIANCE, NEEDS_LAMBDA_PASS
from engine.curvature.fitting import corrected_factors, module_widths, shared_basis
from engine.curvature.packing import (
    covariance_counts,
    covariance_width,
    lambda_width,
    shapes_width,
    unpack_covariance,
    unpack_lambda,
)
from engine.curvature.statistics import ModuleCovariance
from engine.data.rows import dataset_fingerprint
from engine.errors import TributaryError
from engine.indexing.exact_sums import create_pass_one_sums
from engine.indexing.executor import ShardExecutor
from engine.indexing.lambda_source import writes_fisher_rows
from engine.indexing.manifest import build_manifest
from engine.progress import progress_bar
from engine.projection import ProjectionSpec
from engine.projection.fitted import covariance_shapes, fit_shapes, fit_shards, fitted_matrices, full_width
from engine.projection.whitened import WHITENED_KIND, whitened_matrices, whitening_matrices
from engine.store import GradientStore, location
from engine.store.manifest import IndexRunRecord, ShardCommit, SkippedRow, StoreManifest
from engine.store.opening import open_or_create
from engine.store.zarr_store import default_rows_per_chunk
from engine.testing.faults import fault_point

log = logging.getLogger(__name__)


class IndexRun:
    """One run of the driver over a store: commits shards and records what this run computed."""

    def __init__(self, store: GradientStore, executor, spec: ProjectionSpec, progress, workers: int):
        self.store = store
        self.executor = executor
        self.spec = spec
        self.progress = progress
        self.record = IndexRunRecord(
            started=time.strftime("%Y-%m-%dT%H:%M:%S"), host=socket.gethostname(), workers=workers
        )
        self.earlier_runs = store.manifest.runs
        self.computed: dict[str, list[int]] = {}
        store.update_manifest(runs=self._runs())

    def _runs(self) -> list[IndexRunRecord]:
        return [
            *self.earlier_runs,
            IndexRunRecord.model_validate({**self.record.model_dump(), "computed": self.computed}),
        ]

    def stage(self, stage: str, only: list[int] | None = None, method: str | None = None) -> None:
        """Run every shard of `stage` not yet committed (`only`: of those shards); `method`: the workers' method
        when it is not named `stage` (one method run as several stages, each committed under its own name)."""
        shards = self.store.shards()
        committed = dict(self.store.manifest.shards.get(stage, {}))
        wanted = range(len(shards)) if only is None else only
        pending = [i for i in wanted if i not in committed]
        computed = self.computed.setdefault(stage, [])
        task = self.progress.add_task(
            f"{stage:<9}",
            total=sum(shards[i][1] - shards[i][0] for i in wanted),
            completed=sum(shards[i][1] - shards[i][0] for i in committed),
        )
        for receipt in self.executor.run(method or stage, pending):
            shard = receipt["shard"]
            if shard in committed:
                continue  # a late duplicate from a re-issued shard: each shard is committed once
            committed[shard] = ShardCommit(**{k: receipt[k] for k in ("checksum", "arrays", "node", "pid", "seconds")})
            computed.append(shard)
            self._commit(stage, committed, [SkippedRow(**row) for row in receipt.get("skipped", [])])
            self.progress.advance(task, shards[shard][1] - shards[shard][0])
            fault_point("driver", stage, len(computed))

    def _commit(self, stage: str, committed: dict[int, ShardCommit], skipped: list[SkippedRow]) -> None:
        """One manifest write: the shard is done, with the rows it skipped (so a resume never loses them)."""
        changes: dict = {"shards": {**self.store.manifest.shards, stage: committed}, "runs": self._runs()}
        if stage == "gradients":
            changes["completed_shards"] = sorted(committed)
            if skipped:
                rows = {row.row: row for row in [*self.store.manifest.skipped, *skipped]}
                changes["skipped"] = [rows[row] for row in sorted(rows)]
        self.store.update_manifest(**changes)

    def mark(self, stage: str) -> None:
        self.store.update_manifest(stages={**self.store.manifest.stages, stage: True})

    def done(self, stage: str) -> bool:
        return self.store.manifest.stages.get(stage, False)


def build_store(
    config: JobConfig,
    rows: int,
    executor: ShardExecutor,
    overwrite: bool,
    show_progress: bool,
    started: float | None = None,
) -> GradientStore:
    """Create (or resume) the store at config.store.path and run every stage; the caller holds the lock."""
    started = time.perf_counter() if started is None else started
    facts = executor.describe()
    spec = ProjectionSpec.from_dict(facts["spec"])
    coverage = facts.get("coverage") or {}
    for line in coverage_lines(coverage):
        log.info("%s", line)
    manifest = StoreManifest.model_validate(
        dict(
            build_manifest(config, spec, facts["fingerprints"], dataset_fingerprint(config.data.train), coverage),
            rows=rows,
            width=spec.total_width,
            dtype=config.store.dtype,
            rows_per_chunk=config.store.rows_per_chunk
            or default_rows_per_chunk(
                spec.total_width, config.store.dtype, rows, config.data.batch_size, _partial_width(config, spec)
            ),
        )
    )
    store, resumed = open_or_create(GradientStore, config.store.path, manifest, overwrite)
    if store.manifest.complete:
        log.info("store %s is complete and up to date; nothing to do", location.redact(config.store.path))
        return store
    if resumed:
        _check_resumable(store, config, spec)
        log.info(
            "resuming %s: %d of %d gradient shards already done",
            location.redact(config.store.path),
            len(store.manifest.completed_shards),
            len(store.shards()),
        )
    timings = {"setup_s": time.perf_counter() - started}
    _run_stages(config, store, executor, spec, show_progress, timings)
    skipped = store.manifest.skipped
    if skipped:
        shown = ", ".join(row.id for row in skipped[:5]) + (", …" if len(skipped) > 5 else "")
        log.warning(
            "skipped %d of %d rows with non-finite values (data.on_nonfinite: skip): %s; they are listed in the "
            "manifest's `skipped`, stored as zeros and never ranked",
            len(skipped),
            rows,
            shown,
        )
    timings["total_s"] = time.perf_counter() - started
    store.update_manifest(complete=True, timings={k: round(v, 4) for k, v in timings.items()})
    return store


def _check_resumable(store: GradientStore, config: JobConfig, spec: ProjectionSpec) -> None:
    """A resumed store's partial sums have the layout this version writes (one line and nothing written if not)."""
    if spec.fitted:
        full = full_width(spec)
        store.check_partials_layout(
            "projection_covariance", shapes_width(covariance_shapes(spec)), covariance_counts(full)
        )
        if spec.kind == WHITENED_KIND:
            store.check_partials_layout("projection_gram", shapes_width(fit_shapes(spec)), covariance_counts(full))
    if config.curvature.strategy in NEEDS_COVARIANCE:
        store.check_partials_layout("covariance", covariance_width(spec), covariance_counts(spec))
    if config.curvature.strategy in NEEDS_LAMBDA_PASS:
        store.check_partials_layout("lambda", lambda_width(spec), 1)


def _name_unrouted_experts(store: GradientStore, covariance: list[dict[str, ModuleCovariance]]) -> None:
    """Routed experts no token of the fit reached, named in the log and the manifest's coverage report: their
    K-FAC/EK-FAC factors are damping alone (README, mixture-of-experts), and their gradient is zero on every row."""
    unrouted = [name for sums in covariance for name, c in sums.items() if c.tokens == 0 and c.examples > 0]
    if unrouted:
        log.warning("%s", unrouted_line(unrouted))
        store.update_manifest(coverage={**store.manifest.coverage, "unrouted_experts": unrouted})


def _partial_width(config: JobConfig, spec: ProjectionSpec) -> int:
    """float64 values of partial sums each shard writes: its covariances (pass 1) and its Λ (the Λ stage)."""
    strategy = config.curvature.strategy
    covariance = covariance_width(spec) if strategy in NEEDS_COVARIANCE else 0
    return covariance + (lambda_width(spec) if strategy in NEEDS_LAMBDA_PASS else 0)


def _fit_projection(store: GradientStore, run: IndexRun, spec: ProjectionSpec) -> None:
    """Stage `projection` (fitted kinds): full-width K-FAC covariance sums of the fit rows per shard, reduced in
    shard order and turned into each side's matrix once, here; the workers then read the matrices from the store.
    grad_pca_whitened adds stage `projection_gram` over the same rows (engine.projection.whitened)."""
    full, shapes = full_width(spec), covariance_shapes(spec)
    store.create_partials("projection_covariance", shapes_width(shapes), covariance_counts(full))
    fitted = fit_shards(store.shards(), store.rows, spec.fit_rows)
    run.stage("projection", only=fitted)
    sums = unpack_covariance(*store.summed_partials("projection_covariance", fitted), full, shapes)
    covariances = {name: (c.a_sum, c.s_sum) for name, c in sums.items()}
    if spec.kind == WHITENED_KIND:
        run.executor.reset()
        store.create_partials("projection_gram", shapes_width(fit_shapes(spec)), covariance_counts(full))
        run.stage("projection_gram", only=fitted)
        grams = unpack_covariance(*store.summed_partials("projection_gram", fitted), full, fit_shapes(spec))
        matrices = whitened_matrices(
            spec, {name: (c.a_sum, c.s_sum) for name, c in grams.items()}, whitening_matrices(covariances)
        )
    else:
        matrices = fitted_matrices(spec, covariances)
    store.write_projection(matrices)
    run.mark("projection")


def _run_stages(
    config: JobConfig, store: GradientStore, executor, spec: ProjectionSpec, show_progress: bool, timings: dict
) -> None:
    strategy = config.curvature.strategy
    widths = module_widths(spec)
    workers = len(getattr(executor, "actors", [None]))
    with progress_bar(show_progress) as progress:
        run = IndexRun(store, executor, spec, progress, workers)
        if spec.fitted and not run.done("projection"):
            clock = time.perf_counter()
            _fit_projection(store, run, spec)
            executor.reset()
            timings["projection_s"] = time.perf_counter() - clock
        if strategy in NEEDS_COVARIANCE:
            store.create_partials("covariance", covariance_width(spec), covariance_counts(spec))
        create_pass_one_sums(config, store, spec)  # exact.factors: the full-width covariances in pass 1
        fisher_rows = writes_fisher_rows(config)
        if fisher_rows and not store.manifest.shards.get("gradients"):
            store.create_fisher_rows()  # only before pass 1's first shard: every shard then writes its rows
        clock = time.perf_counter()
        run.stage("gradients")
        timings["pass1_s"] = time.perf_counter() - clock
        if not run.done("eigen"):
            needed = strategy in NEEDS_COVARIANCE
            if needed and len(store.manifest.skipped) == store.manifest.rows:
                raise TributaryError(
                    f"every row of {config.data.train} has non-finite values and was skipped "
                    "(data.on_nonfinite: skip), so there is no curvature to fit; check the model's weights and "
                    "model.dtype (float16 overflows: use float32 or bfloat16)"
                )
            covariance = [unpack_covariance(*store.summed_partials("covariance"), spec)] if needed else []
            _name_unrouted_experts(store, covariance)
            store.write_factors(shared_basis(strategy, widths, covariance))
            run.mark("eigen")
        if strategy in NEEDS_LAMBDA_PASS:
            store.create_partials("lambda", lambda_width(spec), 1)
            executor.reset()
            clock = time.perf_counter()
            run.stage("lambdas")
            timings["pass2_s"] = time.perf_counter() - clock
            lambdas = unpack_lambda(*store.summed_partials("lambda"), spec)
            store.write_factors(corrected_factors(strategy, store.read_factors(), [lambdas]))
        run.mark("final")
        if store.has_fisher_rows() and not config.store.keep_fisher_grads:
            store.delete_fisher_rows()  # also one left by pass 1 under an earlier version's choice of Λ path
