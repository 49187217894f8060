"""Where work runs: in this process, or on Ray workers when the config has a `cluster` section.

indexing and query run everything in this process and take the executor of shards or the scan of a store
as an argument; this module, above engine.distributed, hands them the Ray-backed ones. `tributary index`
and `tributary query`, the demos, the tests and the benchmarks index and query through here.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np

from engine.config import ClusterConfig, JobConfig, QueryOptions
from engine.distributed.cluster import connect, pool_size
from engine.distributed.fan_out import call_on_new_actors
from engine.distributed.groups import GroupExecutor, group_count
from engine.distributed.pool import RayExecutor, largest_node_gpus
from engine.errors import TributaryError
from engine.exact.exact_query import ExactResult, run_exact_query
from engine.exact.fit import check_exact_config, fit_exact_factors
from engine.exact.queries import ExactQueries
from engine.exact.worker import ExactWorker
from engine.exact.zero_worker import ZeroExactWorker
from engine.gradients.context import ModelContext, remote_model_context
from engine.indexing import plan_and_build as indexing
from engine.indexing.executor import LocalExecutor, ShardExecutor
from engine.indexing.worker import ShardWorker
from engine.indexing.zero_worker import ZeroShardWorker
from engine.model.loading import load_tokenizer
from engine.model.placement import check_placement
from engine.projection import ProjectionSpec
from engine.query import plan_and_score as query
from engine.query.row_range import RowRangeScorer, merge_parts, row_ranges
from engine.query.scoring import QueryResult
from engine.store import GradientStore
from engine.store.lock import StoreLock
from engine.store.run_store import RunStore


def shard_executor(config: JobConfig) -> ShardExecutor:
    """This process, or with a `cluster` section a pool of ShardWorker actors (one per GPU, or per CPU share);
    with placement.kind zero3, groups of ZeroShardWorker ranks that each hold the model partitioned."""
    if config.cluster is None:
        return LocalExecutor(config)
    connect(config.cluster)
    check_placement(config, gpus=largest_node_gpus())
    if config.placement.kind == "zero3":
        world = config.placement.devices_per_replica
        return GroupExecutor(ZeroShardWorker, (config,), config.cluster, group_count(config.cluster, world), world)
    gpus = config.placement.devices_per_replica if config.placement.kind == "device_map" else None
    return RayExecutor(ShardWorker, (config,), config.cluster, pool_size(config.cluster), gpus_per_actor=gpus)


class ClusterScan:
    """A scoring pass on row-range actors started for it (and stopped after); their top-k lists merged here."""

    def __init__(self, cluster: ClusterConfig, store: GradientStore):
        self.cluster = cluster
        self.store = store

    def __call__(self, transformed: np.ndarray, normalise: bool, k: int, full: bool) -> QueryResult:
        cluster = self.cluster
        connect(cluster)
        threads = cluster.cpus_per_worker
        ranges = row_ranges(len(self.store.shards()), pool_size(cluster))
        constructions = [(self.store.path, a, b, threads) for a, b in ranges]
        parts = call_on_new_actors(
            RowRangeScorer, constructions, cluster.cpus_per_worker, "score", transformed, normalise, k, full
        )
        return merge_parts(parts, k, full)


def run_index(
    config: JobConfig, overwrite: bool = False, show_progress: bool = True, break_lock: bool = False
) -> GradientStore | RunStore:
    """engine.indexing.plan_and_build.plan_and_build, on the cluster when the config has a `cluster` section; with
    `exact: {factors: true}` the full-width factors are fitted after (engine.exact.fit)."""
    check_exact_config(config)
    store = indexing.plan_and_build(
        config, overwrite=overwrite, show_progress=show_progress, break_lock=break_lock, executors=shard_executor
    )
    if config.exact.factors:  # a training run's at its final checkpoint, where its exact pass scores
        final = store.final_config(config)
        executor = exact_executor(final)
        try:
            with StoreLock(config.store.path, break_lock=break_lock):
                writable = GradientStore.open(final.store.path, mode="r+")
                fit_exact_factors(final, writable, executor, show_progress)
        finally:
            executor.shutdown()
        store = type(store).open(config.store.path)
    return store


def exact_executor(
    config: JobConfig, queries: ExactQueries | None = None, context: ModelContext | None = None
) -> ShardExecutor:
    """The exact stages' shards in this process (reusing `context`, a model already loaded), or with a
    `cluster` section on a pool of ExactWorker actors, as indexing's."""
    if config.cluster is None:
        return LocalExecutor(worker=ExactWorker(config, queries, context=context))
    connect(config.cluster)
    check_placement(config, gpus=largest_node_gpus())
    if config.placement.kind == "zero3":
        world = config.placement.devices_per_replica
        groups = group_count(config.cluster, world)
        return GroupExecutor(ZeroExactWorker, (config, queries), config.cluster, groups, world)
    gpus = config.placement.devices_per_replica if config.placement.kind == "device_map" else None
    return RayExecutor(ExactWorker, (config, queries), config.cluster, pool_size(config.cluster), gpus_per_actor=gpus)


def run_exact(
    config: JobConfig,
    queries_path: str,
    options: QueryOptions,
    out: str | None = None,
    scores_out: str | None = None,
    rescore: int | None = None,
) -> ExactResult:
    """engine.exact.exact_query.run_exact_query with this module's executors; `rescore` K takes the store's (or with
    options.approximate its ANN index's) top-K and bottom-K candidates from run_query."""

    def candidates(k: int) -> QueryResult:
        return run_query(config, queries_path, k, options=replace(options, k=k))

    if config.placement.kind != "zero3":
        return run_exact_query(
            config,
            queries_path,
            options,
            exact_executor,
            out=out,
            scores_out=scores_out,
            rescore=rescore,
            candidates=candidates,
            local_context=config.cluster is None,
        )
    groups = ExactGroups()
    try:
        return run_exact_query(
            config,
            queries_path,
            options,
            groups.scoring,
            out=out,
            scores_out=scores_out,
            rescore=rescore,
            candidates=candidates,
            local_context=False,
            load_context=groups.context,
        )
    finally:
        groups.shutdown()


class ExactGroups:
    """The zero3 groups of an exact query: started when the query needs the model (its inputs checked by then),
    the first group's ranks give the queries' full-width gradients, then every group scores the training rows
    against them (one model load for both)."""

    def __init__(self) -> None:
        self._executor: GroupExecutor | None = None

    def context(self, config: JobConfig) -> ModelContext:
        executor = exact_executor(config)
        if not isinstance(executor, GroupExecutor):
            raise RuntimeError("ExactGroups is for placement.kind zero3")
        self._executor = executor
        return _group_model_context(config, executor.describe(), self._gradients)

    def _gradients(self, rows: list, measurement: str) -> np.ndarray:
        if self._executor is None:
            raise RuntimeError("ExactGroups gradients before context()")
        return self._executor.call_all("exact_query_gradients", rows, measurement)[0]

    def scoring(self, config: JobConfig, queries: ExactQueries, context: ModelContext | None) -> ShardExecutor:
        if self._executor is None:
            raise RuntimeError("ExactGroups scoring before context()")
        self._executor.call_every_rank("use_queries", queries)
        return self._executor

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None


def run_query(
    config: JobConfig,
    queries_path: str,
    k: int,
    out: str | None = None,
    scores_out: str | None = None,
    per_module: bool = False,
    options: QueryOptions | None = None,
    report: str | None = None,
) -> QueryResult:
    """engine.query.plan_and_score.plan_and_score, scored on the cluster when the config has a `cluster` section; with
    placement.kind zero3 the query gradients come from one group of ranks started for the query."""
    scans = None if config.cluster is None else partial(ClusterScan, config.cluster)
    groups = QueryGroups()
    try:
        return query.plan_and_score(
            config,
            queries_path,
            k,
            out=out,
            scores_out=scores_out,
            per_module=per_module,
            options=options,
            report=report,
            scans=scans,
            load_context=groups.context if config.placement.kind == "zero3" else None,
        )
    finally:
        groups.shutdown()


def _group_model_context(config: JobConfig, facts: dict, gradients) -> ModelContext:
    """The driver's model context for a zero3 group: the tokenizer here, the spec and fingerprints the group's
    ranks described, and query gradients computed by the group."""
    return remote_model_context(
        config,
        load_tokenizer(config.model.tokenizer or config.model.path, config.model.trust_remote_code),
        ProjectionSpec.from_dict(facts["spec"]),
        facts["fingerprints"],
        gradients,
    )


class QueryGroups:
    """The zero3 group a query's gradients come from: started when the query needs the model (its inputs
    checked by then) and stopped as soon as the gradients are back, so that the scan's actors find the
    cluster's CPUs free (a later call starts a fresh group)."""

    def __init__(self) -> None:
        self._executor: GroupExecutor | None = None
        self._config: JobConfig | None = None

    def _start(self, config: JobConfig) -> GroupExecutor:
        cluster = config.cluster
        if cluster is None:  # the config check requires one with zero3
            raise TributaryError("placement.kind zero3 needs a cluster section; add cluster: {address: local}")
        connect(cluster)
        check_placement(config, gpus=largest_node_gpus())
        world = config.placement.devices_per_replica
        group_count(cluster, world)  # refuses a group the cluster cannot place
        self._executor = GroupExecutor(ZeroShardWorker, (config,), cluster, 1, world)
        self._config = config
        return self._executor

    def context(self, config: JobConfig) -> ModelContext:
        return _group_model_context(config, self._start(config).describe(), self.gradients)

    def gradients(self, rows: list, measurement: str) -> np.ndarray:
        if self._config is None:
            raise RuntimeError("QueryGroups.gradients before context()")
        executor = self._executor or self._start(self._config)
        try:
            return executor.call_all("query_gradients", rows, measurement)[0]
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None
