"""The single-process index driver: pass 1 over shards, eigendecomposition, pass 2, all into one store."""

from __future__ import annotations

import logging
import time

from engine.config import JobConfig
from engine.curvature.factors import NEEDS_LAMBDA_PASS, final_factors, initial_factors
from engine.curvature.statistics import PartialSums
from engine.errors import TributaryError
from engine.indexing.compute import gradient_pass, lambda_pass
from engine.indexing.job import IndexJob, prepare_index_job
from engine.progress import progress_bar
from engine.store import GradientStore, location
from engine.store.compatibility import mismatches
from engine.store.lock import LOCK_NAME
from engine.store.zarr_store import default_rows_per_chunk

log = logging.getLogger(__name__)


def _refuse_foreign(path: str) -> None:
    """Creating a store empties its path: never do that to something that is not a Tributary store."""
    if not location.exists(path):
        return
    fs, root = location.filesystem(path)
    if fs.isdir(root) and all(str(entry).rstrip("/").rsplit("/", 1)[-1] == LOCK_NAME
                              for entry in fs.ls(root, detail=False)):
        return  # an empty directory (or one holding only our writer lock) has nothing to lose
    try:
        GradientStore.open(path)
    except TributaryError:
        raise TributaryError(
            f"store.path {location.redact(path)} already exists and is not a Tributary store; creating the "
            "store would delete what is there. Choose another store.path (or remove it yourself)"
        ) from None


def _check_existing(path: str, manifest: dict, overwrite: bool) -> bool:
    """True when an identical, complete store is already there (nothing to do)."""
    _refuse_foreign(path)
    if overwrite or not GradientStore.exists(path):
        return False
    existing = GradientStore.open(path).manifest
    different = mismatches(existing.get("fingerprints", {}), manifest["fingerprints"])
    if different:
        raise TributaryError(
            f"store {path} was built from a different " + ", ".join(different)
            + "; choose another store.path or pass --overwrite to replace it"
        )
    settings_changed = existing.get("curvature") != manifest["curvature"]
    if existing.get("complete") and not settings_changed:
        return True
    if settings_changed:
        raise TributaryError(
            f"store {path} was built with curvature settings {existing.get('curvature')}; "
            "choose another store.path or pass --overwrite to rebuild it"
        )
    return False


def create_store(job: IndexJob) -> GradientStore:
    config = job.config
    width = job.context.spec.total_width
    rows_per_chunk = config.store.rows_per_chunk or default_rows_per_chunk(width, config.store.dtype,
                                                                           len(job.rows))
    return GradientStore.create(config.store.path, job.manifest(), rows=len(job.rows), width=width,
                                dtype=config.store.dtype, rows_per_chunk=rows_per_chunk)


def write_shard(store: GradientStore, job: IndexJob, result) -> None:
    stop = result.start + len(result.grads)
    ids = [row.id for row in job.rows[result.start:stop]]
    store.write_rows(result.start, result.grads, ids, result.num_tokens, result.losses)


def run_index(config: JobConfig, overwrite: bool = False, show_progress: bool = True) -> GradientStore:
    started = time.perf_counter()
    job = prepare_index_job(config)
    manifest = job.manifest()
    if _check_existing(config.store.path, manifest, overwrite):
        log.info("store %s is complete and up to date; nothing to do", config.store.path)
        return GradientStore.open(config.store.path)
    store = create_store(job)
    strategy = config.curvature.strategy
    shards = store.shards()
    sums = PartialSums()
    timings = {"setup_s": time.perf_counter() - started}
    with progress_bar(show_progress) as progress:
        task = progress.add_task("pass 1: gradients", total=len(job.rows))
        for start, stop in shards:
            result = gradient_pass(job.context, job.tokenized[start:stop], start)
            write_shard(store, job, result)
            sums = sums.merge(result.sums)
            progress.advance(task, stop - start)
        timings["pass1_s"] = time.perf_counter() - started - timings["setup_s"]
        widths = {m.name: (m.k_in, m.k_out) for m in job.context.spec.modules}
        factors = initial_factors(strategy, sums.covariance, widths)
        if strategy in NEEDS_LAMBDA_PASS:
            task = progress.add_task("pass 2: eigenvalues", total=len(job.rows))
            lambdas = PartialSums()
            for start, stop in shards:
                lambdas = lambdas.merge(lambda_pass(job.context, job.tokenized[start:stop], factors))
                progress.advance(task, stop - start)
            factors = final_factors(strategy, factors, lambdas.lambdas)
    store.write_factors(factors)
    timings["total_s"] = time.perf_counter() - started
    store.update_manifest(completed_shards=[list(s) for s in shards], complete=True,
                          timings={key: round(value, 4) for key, value in timings.items()})
    log.info("indexed %d rows into %s", len(job.rows), config.store.path)
    return store
