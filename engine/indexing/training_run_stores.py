"""Index a whole training run: one gradient store per checkpoint in one group, then Source's per-segment factors.

Order of work (each step resumable, recorded in the sub-stores' and the root's manifests):
1. every input is checked first: the run plan (engine.training_run.resolve), every dataset's rows, the
   optimizer states of a preconditioned run, and the learning rates/steps the configured method needs;
2. for each checkpoint (and each segment's averaged parameters, for Fast-Source) a fresh executor — the
   workers load that checkpoint's weights — builds a complete single-checkpoint store under
   checkpoints/<key>, with the same projection (the spec is checked against the run's);
3. for each segment that is more than one plain checkpoint: the covariance sums of its checkpoints are added
   and eigendecomposed once, every checkpoint's Λ is computed in that shared basis (a pass per checkpoint,
   of P̄^{1/2}-scaled gradients for Adam) and the sums are averaged — Source App. D.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from engine.capture.modules import select_modules
from engine.config import JobConfig
from engine.curvature.factors import NEEDS_LAMBDA_PASS, ModuleFactors
from engine.curvature.fitting import corrected_factors, fit_factors, module_widths
from engine.curvature.packing import lambda_width, unpack_covariance, unpack_lambda
from engine.curvature.statistics import ModuleLambda
from engine.errors import TributaryError
from engine.indexing.executor import ExecutorFactory
from engine.indexing.single_store import IndexRun, build_store
from engine.progress import progress_bar
from engine.projection import ProjectionSpec
from engine.store import GradientStore, location
from engine.store.lock import StoreLock
from engine.store.manifest import RunManifest, RunStoreSettings
from engine.store.opening import open_or_create
from engine.store.run_store import RunStore
from engine.store.writable import check_store_location
from engine.training_run.configs import checkpoint_config
from engine.training_run.optimizer_state import meta_model, read_preconditioner
from engine.training_run.plan import RunPlan, SegmentPlan
from engine.training_run.preconditioner import average, square_root
from engine.training_run.resolve import require_schedule

log = logging.getLogger(__name__)


def _run_manifest(config: JobConfig, plan: RunPlan, spec: ProjectionSpec) -> RunManifest:
    return RunManifest(
        plan=plan,
        projection=spec,
        curvature=config.curvature.model_dump(exclude={"lambdas"}),  # as engine.indexing.manifest: not compared
        store=RunStoreSettings(dtype=config.store.dtype, rows_per_chunk=config.store.rows_per_chunk),
    )


def _averaged_model(paths: list[str], target: Path, dtype: torch.dtype) -> str:
    """Save the mean of the checkpoints' parameters (Fast-Source's θ̄_ℓ) as an HF model directory."""
    from transformers import AutoModelForCausalLM

    total = None
    for path in paths:
        state = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, local_files_only=True).state_dict()
        total = state if total is None else {k: total[k] + state[k] for k in total}
    if total is None:
        raise ValueError("averaging a segment's parameters needs at least one checkpoint")
    model = AutoModelForCausalLM.from_pretrained(paths[-1], dtype=dtype, local_files_only=True)
    model.load_state_dict({k: (v / len(paths)).to(dtype) for k, v in total.items()})
    model.save_pretrained(target)
    return str(target)


def _averaged_root(config: JobConfig) -> Path:
    local = location.local_path(config.store.path)
    if local is None:
        raise TributaryError(
            "training_run.averaged writes each segment's averaged model next to the store, so "
            "store.path must be local; use a local store.path (or set averaged: false)"
        )
    return Path(local + ".averaged")


def _index_checkpoint(
    config: JobConfig, rows: int, show_progress: bool, spec: ProjectionSpec, executors: ExecutorFactory
) -> GradientStore:
    executor = executors(config)
    try:
        store = build_store(config, rows, executor, overwrite=False, show_progress=show_progress)
    finally:
        executor.shutdown()
    if store.manifest.projection.fingerprint() != spec.fingerprint():
        raise TributaryError(
            f"checkpoint {config.model.path} has other tracked modules or shapes than the run's final checkpoint; "
            "every checkpoint of a run must be the same architecture"
        )
    return store


def _shared_lambdas(
    config: JobConfig,
    store: GradientStore,
    basis: dict[str, ModuleFactors],
    scale: dict[str, np.ndarray] | None,
    spec: ProjectionSpec,
    show_progress: bool,
    executors: ExecutorFactory,
) -> dict[str, ModuleLambda]:
    """Λ sums of one checkpoint in a segment's shared basis (the worker stage `segment_lambdas`)."""
    store.write_factors(basis, "segment_basis")
    if scale is not None:
        store.write_module_arrays("segment_scale", scale)
    store.create_partials("segment_lambda", lambda_width(spec), 1)
    executor = executors(config)
    try:
        with progress_bar(show_progress) as progress:
            IndexRun(store, executor, spec, progress, len(getattr(executor, "actors", [None]))).stage("segment_lambdas")
    finally:
        executor.shutdown()
    return unpack_lambda(*store.summed_partials("segment_lambda"), spec)


def _segment_factors(
    config: JobConfig,
    root: RunStore,
    segment: SegmentPlan,
    configs: dict[str, JobConfig],
    spec: ProjectionSpec,
    scale: dict[str, np.ndarray] | None,
    show_progress: bool,
    executors: ExecutorFactory,
) -> dict[str, ModuleFactors]:
    """Covariances added over the segment's checkpoints, one eigendecomposition, Λ at every checkpoint in that
    basis, averaged (`fit_factors`, the parts being the checkpoints' stores)."""
    stores = {name: root.checkpoint(name, mode="r+") for name in segment.checkpoints}
    return fit_factors(
        config.curvature.strategy,
        module_widths(spec),
        segment.checkpoints,
        lambda name: unpack_covariance(*stores[name].summed_partials("covariance"), spec),
        lambda name, basis, scale: _shared_lambdas(
            configs[name], stores[name], basis, scale, spec, show_progress, executors
        ),
        scale,
    )


def check_training_index(config: JobConfig, plan: RunPlan) -> None:
    """What a training run's index refuses on the config and the run's plan alone (engine.indexing.plan calls
    it before any row is read)."""
    require_schedule(plan, config.method.name)
    if config.data.on_nonfinite == "skip":  # each checkpoint would skip other rows: no one set of rows to rank
        raise TributaryError(
            "data.on_nonfinite: skip is for single-checkpoint stores; a training run (training_run section) "
            "needs finite gradients at every checkpoint: set data.on_nonfinite: error"
        )
    strategy = config.curvature.strategy
    if plan.preconditioned and strategy not in NEEDS_LAMBDA_PASS:
        raise TributaryError(
            f"training_run.optimizer.preconditioned needs curvature.strategy ekfac or diagonal "
            f"(Λ of P^1/2 H P^1/2 comes from the eigenvalue-correction pass), not {strategy}"
        )


def run_training_index(
    config: JobConfig,
    plan: RunPlan,
    rows: dict[str, int],
    spec: ProjectionSpec,
    executors: ExecutorFactory,
    overwrite: bool = False,
    show_progress: bool = True,
    break_lock: bool = False,
) -> RunStore:
    """Index the run `plan` (checked by check_training_index), with the training rows of each dataset and the
    projection spec as engine.indexing.plan resolved them."""
    started = time.perf_counter()
    check_store_location(config.store.path)
    preconditioners = {}
    if plan.preconditioned:
        if config.training_run is None:
            raise ValueError("a preconditioned plan comes from a config with a training_run section")
        model = meta_model(plan.final.weights, config.model.trust_remote_code)
        modules = select_modules(model, config.model.modules)
        for checkpoint in plan.checkpoints:
            preconditioners[checkpoint.name] = read_preconditioner(
                checkpoint.weights, model, modules, spec, config.model.include_bias, config.training_run.optimizer
            )
    averaged_root = _averaged_root(config) if plan.averaged else None
    configs = {
        c.name: checkpoint_config(
            config,
            c.weights,
            plan.datasets[plan.segments[c.segment].dataset],
            RunStore.checkpoint_path_for(config.store.path, c.name),
        )
        for c in plan.checkpoints
    }
    if config.exact.factors:  # fitted at the final checkpoint only: the others' pass 1 sums no full-width covariances
        configs = {
            name: c if name == plan.final.name else c.derive(part_of_run=True, exact={"factors": False})
            for name, c in configs.items()
        }
    with StoreLock(config.store.path, break_lock=break_lock):
        root, _ = open_or_create(RunStore, config.store.path, _run_manifest(config, plan, spec), overwrite)
        if root.manifest.complete:
            log.info("store %s is complete and up to date; nothing to do", location.redact(config.store.path))
            return root
        for checkpoint in plan.checkpoints:
            dataset = plan.datasets[plan.segments[checkpoint.segment].dataset]
            log.info("checkpoint %s (%s)", checkpoint.name, checkpoint.path)
            store = _index_checkpoint(configs[checkpoint.name], rows[dataset], show_progress, spec, executors)
            if plan.preconditioned:
                store.write_module_arrays("preconditioner", preconditioners[checkpoint.name])
        for segment in plan.segments:
            if segment.index in root.manifest.segments_done:
                continue
            scale = None
            if plan.preconditioned:
                mean = average([preconditioners[name] for name in segment.checkpoints])
                root.write_segment_preconditioner(segment.index, mean)
                scale = square_root(mean)
            if plan.fits_own_factors(segment):
                factors = _segment_factors(config, root, segment, configs, spec, scale, show_progress, executors)
                root.write_segment_factors(segment.index, factors)
            if averaged_root is not None:  # plan.averaged
                _index_averaged(config, root, plan, segment, averaged_root, rows, spec, scale, show_progress, executors)
            root.update_manifest(segments_done=[*root.manifest.segments_done, segment.index])
        root.update_manifest(complete=True, timings={"total_s": round(time.perf_counter() - started, 4)})
    log.info("indexed %d checkpoints into %s", len(plan.checkpoints), location.redact(config.store.path))
    return root


def _index_averaged(
    config: JobConfig,
    root: RunStore,
    plan: RunPlan,
    segment: SegmentPlan,
    averaged_root: Path,
    rows: dict[str, int],
    spec: ProjectionSpec,
    scale: dict[str, np.ndarray] | None,
    show_progress: bool,
    executors: ExecutorFactory,
) -> None:
    """Fast-Source: a store at the segment's averaged parameters (own factors; of P̄^{1/2} H P̄^{1/2} for Adam)."""
    from engine.model.loading import DTYPES

    group = segment.averaged.group_name
    paths = [plan.checkpoint(name).weights for name in segment.checkpoints]
    weights = _averaged_model(paths, averaged_root / group, DTYPES[config.weights_dtype])
    dataset = plan.datasets[segment.dataset]
    sub = checkpoint_config(config, weights, dataset, root.checkpoint_path(group))
    store = _index_checkpoint(sub, rows[dataset], show_progress, spec, executors)
    if scale is not None:
        own = store.read_factors()
        basis = {name: ModuleFactors(f.strategy, f.lam, f.q_a, f.q_s, f.alpha, f.sigma) for name, f in own.items()}
        lambdas = _shared_lambdas(sub, store, basis, scale, spec, show_progress, executors)
        store.write_factors(corrected_factors(config.curvature.strategy, basis, [lambdas]), "preconditioned_factors")
