"""`exact: {factors: true}`: EK-FAC (or K-FAC) fitted at full width beside a finished store.

Stages, each committed per shard in the manifest as indexing's are (a killed run resumes): the full-width
covariance sums — reused where the index made them over every row (pass 1's at projection dim 0 or, with a
random projection, summed by pass 1 beside its rows; a fitted projection's unsketched fitting pass over all rows);
otherwise a forward and a backward per batch
(`exact_covariance`) — then the eigenbases (`exact_eigen`, in the driver, float64), then EK-FAC's Λ from
a full-width pass in that basis (`exact_lambdas`), written as `exact_factors`, one subgroup per module.
"""

from __future__ import annotations

import time

from engine.config import JobConfig
from engine.config.capabilities import check_exact_factors
from engine.config.validation import config_store_kind
from engine.curvature.fitting import corrected_factors, module_widths, shared_basis
from engine.curvature.packing import covariance_width, lambda_width, unpack_covariance, unpack_lambda
from engine.errors import TributaryError
from engine.exact.partition import lambda_stage, module_groups
from engine.exact.stored_factors import (
    BASIS,
    FACTORS,
    full_spec,
    has_exact_factors,
    read_exact_factors,
    set_lambda_group,
    write_exact_factors,
)
from engine.indexing.exact_sums import PASS_ONE_EXACT, has_pass_one_sums
from engine.indexing.executor import ShardExecutor
from engine.indexing.single_store import IndexRun
from engine.progress import progress_bar
from engine.projection import ProjectionSpec
from engine.store import GradientStore

STRATEGIES = ("kfac", "ekfac")


def check_exact_config(config: JobConfig) -> None:
    """Refuse, before anything is written, what full-width factors cannot be fitted for."""
    if not config.exact.factors:
        return
    if config.curvature.strategy not in STRATEGIES:
        raise TributaryError(
            f"exact.factors fits K-FAC/EK-FAC at full width, but curvature.strategy is {config.curvature.strategy}; "
            "set curvature.strategy to ekfac or kfac, or remove exact.factors"
        )
    check_exact_factors(config.placement.kind, config_store_kind(config))


def fit_exact_factors(config: JobConfig, store: GradientStore, executor: ShardExecutor, show_progress: bool) -> None:
    """Fit and write the store's full-width factors unless they are there already."""
    if has_exact_factors(store):
        return
    full = full_spec(store)
    groups = module_groups(full, config.exact.factor_memory_gb)  # refused here, before a pass, if a module cannot fit
    strategy = config.curvature.strategy
    workers = len(getattr(executor, "actors", [None]))
    timings: dict[str, float] = {}
    with progress_bar(show_progress) as progress:
        run = IndexRun(store, executor, store.manifest.projection, progress, workers)
        if not run.done("exact_eigen"):
            reused = _full_width_sums(store)
            if reused is not None:
                sums = reused
            else:
                store.create_partials("exact_covariance", covariance_width(full), 2)
                clock = time.perf_counter()
                run.stage("exact_covariance")
                timings["exact_covariance_s"] = time.perf_counter() - clock
                sums = store.summed_partials("exact_covariance")
            covariance = unpack_covariance(*sums, full)  # every reused or computed sum is d x d per side
            write_exact_factors(store, shared_basis(strategy, module_widths(full), [covariance]), BASIS)
            run.mark("exact_eigen")
        factors = read_exact_factors(store, BASIS)
        if strategy == "ekfac":
            clock = time.perf_counter()
            lambdas = _lambdas(store, run, executor, groups)
            timings["exact_lambda_s"] = time.perf_counter() - clock
            factors = corrected_factors(strategy, factors, [lambdas])
        write_exact_factors(store, factors, FACTORS)
        run.mark(FACTORS)
    measured = {key: round(value, 4) for key, value in timings.items()}
    store.update_manifest(timings={**(store.manifest.timings or {}), **measured})


def _lambdas(store: GradientStore, run: IndexRun, executor: ShardExecutor, groups: list[ProjectionSpec]) -> dict:
    """Λ sums of every module, one stage per module group (each committed per shard under its own name), the
    workers told the group through the store (engine.exact.stored_factors.set_lambda_group)."""
    lambdas = {}
    for number, group in enumerate(groups):
        key, partials = lambda_stage(number, len(groups))
        store.create_partials(partials, lambda_width(group), 1)
        set_lambda_group(store, number)
        executor.reset()  # forget the previous group's bases, and read the group anew
        run.stage(key, method="exact_lambdas")
        lambdas.update(unpack_lambda(*store.summed_partials(partials), group))
    return lambdas


def _full_width_sums(store: GradientStore):
    """Full-width covariance sums over every row that the index already made, or None: pass 1's (at dim 0, or
    beside a random projection's rows), or a fitted projection's fitting pass where it covered every row without a
    sketch (float32 products there in a float32 model, as kronfluence's default covariances; they choose the
    eigenbasis that Λ is then fitted in)."""
    spec = store.manifest.projection
    if has_pass_one_sums(store):  # a random projection's pass 1 summed them (engine.indexing.exact_sums)
        return store.summed_partials(PASS_ONE_EXACT)
    if spec.dim == 0 and store.has_group("partials/covariance"):
        return store.summed_partials("covariance")
    every_row = spec.fit_rows is None or spec.fit_rows >= store.rows
    if spec.fitted and spec.fit == "exact" and every_row and store.has_group("partials/projection_covariance"):
        return store.summed_partials("projection_covariance")
    return None
