"""Which checkpoints an exact pass scores at, and each one's weight in the sum: the final checkpoint alone for the
single-term methods (a single-checkpoint store is a run of one), every checkpoint of a run for TracInCP
(Σ_c η_c ⟨g_q^c, g_i^c⟩: one grad_dot pass per checkpoint, at its weights, over its sub-store's rows)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import JobConfig, MethodConfig
from engine.errors import TributaryError
from engine.spectral.methods import Method, method_from_config, tracin_rate
from engine.store import GradientStore
from engine.store.run_store import RunStore
from engine.training_run.configs import checkpoint_config


@dataclass
class ScoredCheckpoint:
    config: JobConfig  # that checkpoint's weights, rows and sub-store
    store: GradientStore
    method: Method  # the single-term method scored there
    weight: float  # its factor in the sum


def scored_checkpoints(config: JobConfig, opened: GradientStore | RunStore) -> list[ScoredCheckpoint]:
    if config.method.name != "tracin":  # tracin is refused on a single-checkpoint store before this
        final = opened.final_config(config)
        return [ScoredCheckpoint(final, opened.final_store(), method_from_config(config.method), 1.0)]
    plan = opened.run_plan(config)
    grad_dot = method_from_config(MethodConfig(name="grad_dot"))
    out = []
    for checkpoint in plan.checkpoints:
        if checkpoint.path is None:  # a store captured during training keeps only the weights methods need
            raise TributaryError(
                f"checkpoint {checkpoint.name} of store {config.store.path} kept no weights, which --exact with "
                "method tracin runs at; capture with keep_weights=True, or query without --exact/--rescore"
            )
        dataset = plan.datasets[plan.segments[checkpoint.segment].dataset]
        store = opened.checkpoint_store(checkpoint.name)
        sub = checkpoint_config(config, checkpoint.weights, dataset, store.path)
        out.append(ScoredCheckpoint(sub, store, grad_dot, tracin_rate(plan, checkpoint)))
    return out
