"""A service resolved once, in the process that starts it, before any replica loads: the store, the method, the
final model, the placement and the token, with every check that can fail on the config alone.

`resolve_serve_plan` is the only place `tributary serve` (engine.serving.service) opens the store, builds the
method and picks the final model; the replicas and the row-range scorers then only consume the plan, which
travels to them whole (plain data and the method), so each replica opens the final model's store by its path.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.ann.index import AnnIndex
from engine.config import JobConfig
from engine.model.placement import check_placement
from engine.query.attributor import check_method, final_model, open_complete_store
from engine.serving.auth import read_token
from engine.serving.rescore import check_rescore_inputs
from engine.spectral.methods import Method, method_from_config


@dataclass(frozen=True)
class ServePlan:
    config: JobConfig
    final_config: JobConfig  # the final model's config (a training run's last checkpoint)
    final_store: str  # path of the final model's store, which the replicas scan
    method: Method  # the config's method (requests may name others, checked as they arrive)
    shards: int  # shards of the final model's store, split into row ranges on a cluster


def resolve_serve_plan(config: JobConfig) -> ServePlan:
    """Fail here, with the store's own message, not in a replica; likewise for a configured token that is
    missing (its value is not kept). Nothing is started or written."""
    opened = open_complete_store(config.store.path)
    method = method_from_config(config.method)
    check_method(config, opened, method, ("serve",))
    check_placement(config, count_devices=config.serve.replica_gpus == 0)
    final_config, store = final_model(config, opened)
    if config.serve.approximate:
        AnnIndex(config.store.path, store)  # a missing or stale index: refused before any replica starts
    check_rescore_inputs(config, opened)
    read_token(config.serve)
    return ServePlan(config, final_config, store.path, method, len(store.shards()))
