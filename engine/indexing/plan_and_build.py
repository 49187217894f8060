"""`tributary index`: a single-checkpoint store (engine/indexing/single_store.py), or with a `training_run` section one
store per checkpoint of the run (engine/indexing/training_run_stores.py)."""

from __future__ import annotations

import logging
import time

from engine.config import JobConfig
from engine.indexing.budget_fit import measure_budget, needs_measuring
from engine.indexing.executor import ExecutorFactory, in_process
from engine.indexing.plan import resolve_index_plan
from engine.indexing.single_store import build_store
from engine.indexing.training_run_stores import run_training_index
from engine.model.placement import check_placement
from engine.store import GradientStore, location
from engine.store.lock import StoreLock
from engine.store.run_store import RunStore
from engine.store.space import disk_full, is_disk_full
from engine.store.writable import check_store_location

log = logging.getLogger(__name__)


def plan_and_build(
    config: JobConfig,
    overwrite: bool = False,
    show_progress: bool = True,
    break_lock: bool = False,
    executors: ExecutorFactory = in_process,
) -> GradientStore | RunStore:
    """Index `config`, resolved once into an IndexPlan (engine.indexing.plan) and then executed: a GradientStore,
    or with a `training_run` section a RunStore (one store per checkpoint). `executors` makes the executor of each store's shards (engine.local_or_ray passes a Ray-backed one for a cluster)."""
    started = time.perf_counter()
    plan = resolve_index_plan(config)
    if plan.run is not None:
        if plan.spec is None:
            raise ValueError("a training run's plan has its projection spec (a run refuses an adapter)")
        return run_training_index(
            config,
            plan.run,
            plan.rows,
            plan.spec,
            overwrite=overwrite,
            show_progress=show_progress,
            break_lock=break_lock,
            executors=executors,
        )
    rows = plan.rows[config.data.train]
    check_placement(config, count_devices=config.cluster is None)  # a cluster's devices: by its executor
    check_store_location(config.store.path)
    if needs_measuring(config):
        measure_budget(config, rows, executors, show_progress, break_lock, overwrite)
    executor = executors(config)
    try:
        with StoreLock(config.store.path, break_lock=break_lock):
            store = build_store(config, rows, executor, overwrite, show_progress, started)
    except OSError as error:
        if not is_disk_full(error):
            raise
        raise disk_full(config.store.path, error) from None
    finally:
        executor.shutdown()
    log.info("indexed %d rows into %s", rows, location.redact(config.store.path))
    return store
