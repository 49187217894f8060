"""The rules that span sections, checked on every config however it was made (parsed or derived)."""

from __future__ import annotations

from typing import Protocol

from pydantic import ValidationError

from engine.config.capabilities import StoreKind, check_capability
from engine.config.cluster import ClusterConfig
from engine.config.data import DataConfig
from engine.config.method import MethodConfig
from engine.config.model import ModelConfig
from engine.config.placement import PlacementConfig
from engine.config.projection import ProjectionConfig
from engine.config.serve import ServeConfig
from engine.config.training_run import TrainingRunConfig
from engine.errors import TributaryError, shown_name


class JobConfig(Protocol):
    """The sections the rules read (engine.config.job.JobConfig, which calls these rules, has them all)."""

    @property
    def model(self) -> ModelConfig: ...
    @property
    def data(self) -> DataConfig: ...
    @property
    def projection(self) -> ProjectionConfig: ...
    @property
    def method(self) -> MethodConfig: ...
    @property
    def cluster(self) -> ClusterConfig | None: ...
    @property
    def placement(self) -> PlacementConfig: ...
    @property
    def training_run(self) -> TrainingRunConfig | None: ...
    @property
    def serve(self) -> ServeConfig: ...


def check_rules(config: JobConfig, source: str, *, part_of_run: bool = False) -> None:
    """Every rule that spans sections; a TributaryError naming `source` and the fix for the first one broken.

    `part_of_run`: the config of one checkpoint of a training run (engine.training_run.configs), whose
    schedule (Source's eta and steps) comes from the run rather than from its own sections."""
    if not part_of_run:
        _check_source_schedule(config, source)
    _check_serve(config, source)
    _check_placement(config, source)
    check_capability(
        config.method.name, config.placement.kind, None if part_of_run else config_store_kind(config), source=source
    )
    _check_fitted_projection(config, source)
    _check_budget(config, source)


def config_store_kind(config: JobConfig) -> StoreKind:
    """The kind of store `config` indexes (and queries): a training run's, averaged or not, or one checkpoint's."""
    if config.training_run is None:
        return "checkpoint"
    return "averaged_run" if config.training_run.averaged else "training_run"


def describe_errors(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        where = shown_name(".".join(str(part) for part in item["loc"])) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key; remove it or check its spelling")
        elif item["type"] == "missing":
            lines.append(f"  {where}: required key is missing")
        else:
            lines.append(f"  {where}: {item['msg']}")
    return f"invalid config {source}:\n" + "\n".join(lines)


def _check_source_schedule(config: JobConfig, source: str) -> None:
    if (
        config.method.name == "source"
        and config.training_run is None
        and (config.method.eta is None or config.method.steps is None)
    ):
        raise TributaryError(
            f"invalid config {source}: method 'source' needs method.eta (mean learning rate) and "
            "method.steps (optimizer steps K), or a training_run section"
        )


def _check_budget(config: JobConfig, source: str) -> None:
    """projection.budget is built by `tributary index`'s shard workers (engine.store.budget) alone so far."""
    if config.projection.budget is None:
        return
    if config.placement.kind == "zero3" or config.training_run is not None:
        raise TributaryError(
            f"invalid config {source}: projection.budget is not supported with placement.kind zero3 or a "
            "training_run section yet; use projection.dim"
        )


def _check_fitted_projection(config: JobConfig, source: str) -> None:
    """Where the fitted projection kinds are not available yet, said before anything runs."""
    kind = config.projection.kind
    if kind not in ("kfac_eigen", "eigen_sketch", "grad_pca", "grad_pca_whitened") or config.projection.dim == 0:
        return
    if config.placement.kind == "zero3":
        raise TributaryError(
            f"invalid config {source}: projection.kind {kind} is not supported with placement.kind zero3 yet; use "
            "placement.kind single or device_map, or projection.kind rademacher"
        )
    if config.training_run is not None:
        raise TributaryError(
            f"invalid config {source}: projection.kind {kind} fits its matrices to one checkpoint; a training_run "
            "section needs one projection for every checkpoint: use projection.kind rademacher or gaussian"
        )


def _check_placement(config: JobConfig, source: str) -> None:
    """What the config alone decides about placement; devices and torch.distributed are checked where the
    replicas start (engine.model.placement.check_placement)."""
    placement = config.placement
    if placement.max_memory is not None and placement.kind != "device_map":
        raise TributaryError(
            f"invalid config {source}: placement.max_memory is for placement.kind device_map, not {placement.kind}; "
            "remove placement.max_memory or set placement.kind: device_map"
        )
    if placement.offload is not None and placement.kind != "device_map":
        raise TributaryError(
            f"invalid config {source}: placement.offload is for placement.kind device_map, not {placement.kind}; "
            "remove placement.offload or set placement.kind: device_map"
        )
    if placement.kind == "single" and placement.devices_per_replica != 1:
        raise TributaryError(
            f"invalid config {source}: placement.devices_per_replica is {placement.devices_per_replica} but "
            "placement.kind single holds the model on one device; set placement.kind device_map or zero3"
        )
    if placement.kind == "zero3" and config.cluster is None:
        raise TributaryError(
            f"invalid config {source}: placement.kind zero3 runs its ranks as Ray actors; add a cluster section "
            "(cluster: {address: local} runs them on this machine)"
        )
    if placement.kind == "zero3" and config.model.adapter is not None and config.model.adapter_mode != "adapter":
        raise TributaryError(
            f"invalid config {source}: model.adapter_mode {config.model.adapter_mode} is not supported with "
            "placement.kind zero3 (the adapter would be merged into or removed from partitioned weights); use "
            "adapter_mode: adapter, or placement.kind single or device_map"
        )
    if placement.kind == "zero3" and config.data.on_nonfinite == "skip":
        raise TributaryError(
            f"invalid config {source}: data.on_nonfinite skip is not supported with placement.kind zero3 (a rank "
            "re-running a shard without its skipped rows would leave the group's collectives out of step); use "
            "data.on_nonfinite: error, or placement.kind single or device_map"
        )


def _check_serve(config: JobConfig, source: str) -> None:
    serve = config.serve
    if serve.auth_token_env is not None and serve.auth_token_file is not None:
        raise TributaryError(f"invalid config {source}: give serve.auth_token_env or serve.auth_token_file, not both")
    if serve.batch_max_queries < serve.max_queries_per_request:
        raise TributaryError(
            f"invalid config {source}: serve.batch_max_queries ({serve.batch_max_queries}) is smaller than "
            f"serve.max_queries_per_request ({serve.max_queries_per_request}); a full request must fit in one batch"
        )
    if serve.rescore is not None and serve.rescore <= 0:
        raise TributaryError(
            f"invalid config {source}: serve.rescore must be positive, got {serve.rescore}; give how many store "
            "candidates per query and side the exact pass re-scores, or null to serve the store's scores"
        )
    if serve.max_prompt_tokens is not None and serve.max_prompt_tokens >= config.data.max_length:
        raise TributaryError(
            f"invalid config {source}: serve.max_prompt_tokens ({serve.max_prompt_tokens}) must be below "
            f"data.max_length ({config.data.max_length}) so a completion token fits"
        )
